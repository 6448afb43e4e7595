"""Padding-free forwards: a micro-batch's rows packed into one row, as transformers' DataCollatorWithFlattening does.

A (B, L) batch of left-padded prompts and right-padded responses holds sum(attention_mask) real tokens in B x L
slots. Packed, each row's real tokens (contiguous: the prompt's after its left padding, then the response's) follow
the previous row's in a single (1, N) row, with position_ids restarting at 0 at each sequence's first token and no
attention mask. transformers' flash-attention path reads the sequence boundaries from the restarts (cu_seqlens,
flash_attn_varlen_func); its SDPA and eager paths build a block-diagonal causal mask from them. The backbone then
computes N tokens instead of B x L, and the hidden states go back to their (B, L) slots (zeros at the padding).

Where it pays: with varlen attention (flash-attn on CUDA) each sequence's attention costs what it costs alone. With
a block-diagonal mask (SDPA on a CPU) attention computes every pair of the N tokens and masks most of them, more than
the padding that trimmed, length-sorted micro-batches still pay (a few percent), so `padding_free: auto` packs only
where the attention is flash-attn's.

Refused, with a warning, the forwards staying on trimmed micro-batches: models whose layers carry state along the
sequence (Mamba, linear attention: Qwen3-Next and the other hybrids), whose state would flow from one packed
sequence into the next; and any model whose packed forward does not give each sequence what it gets alone, checked
at start-up on two short random sequences.
"""

from __future__ import annotations

import warnings

import torch

# Layer types of attention layers (config.layer_types): any other kind (linear_attention, mamba, conv...) keeps state.
ATTENTION_LAYER_TYPES = {"full_attention", "sliding_attention", "chunked_attention", "attention"}
# Architectures with recurrent or convolutional state that may not list their layers in config.layer_types.
STATEFUL_MODEL_TYPES = {
    "bamba",
    "falcon_h1",
    "falcon_mamba",
    "granitemoehybrid",
    "jamba",
    "lfm2",
    "mamba",
    "mamba2",
    "minimax",
    "nemotron_h",
    "qwen3_next",
    "recurrent_gemma",
    "rwkv",
    "xlstm",
    "zamba",
    "zamba2",
}
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3")


def packed_hidden(backbone, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L, H) the backbone's final hidden states of a padded batch computed over its real tokens only, packed
    into one row; zeros at the padding. Differentiable (training's forward calls it)."""
    real = attention_mask.bool()  # (B, L)
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # each token's place in its own sequence
    # No mask and no cache: transformers reads packed sequences from the position_ids restarts only then.
    out = backbone(
        input_ids=input_ids[real][None], position_ids=positions[real][None], attention_mask=None, use_cache=False
    )
    packed = out.last_hidden_state[0]  # (N, H)
    hidden = packed.new_zeros(*input_ids.shape, packed.shape[-1])
    hidden[real] = packed
    return hidden


def _text_config(model):
    return model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config


def refusal(model, backbone) -> str | None:
    """Why `model` (a transformers model; `backbone` its decoder) must not be run packed, or None."""
    config = _text_config(model)
    layer_types = set(getattr(config, "layer_types", None) or [])
    stateful = layer_types - ATTENTION_LAYER_TYPES
    if config.model_type in STATEFUL_MODEL_TYPES or stateful:
        kinds = ", ".join(sorted(stateful)) or config.model_type
        return f"its layers carry state along the sequence ({kinds}): a packed row would leak it across sequences"
    if not _packs_exactly(backbone, config.vocab_size):
        implementation = getattr(config, "_attn_implementation", None) or "its attention"
        return f"{implementation} does not keep packed sequences apart (a packed forward differs from each alone)"
    return None


@torch.no_grad()
def _packs_exactly(backbone, vocab_size: int) -> bool:
    """Two random sequences (3 and 5 tokens) packed into one row give each the hidden states it gets alone."""
    device = next(backbone.parameters()).device
    g = torch.Generator().manual_seed(0)
    lengths = (3, 5)
    ids = torch.randint(0, vocab_size, (sum(lengths),), generator=g).to(device)
    was_training = backbone.training
    backbone.eval()
    try:
        alone = [
            backbone(input_ids=part[None], position_ids=torch.arange(len(part), device=device)[None], use_cache=False)
            .last_hidden_state[0]
            .float()
            for part in ids.split(lengths)
        ]
        positions = torch.cat([torch.arange(n, device=device) for n in lengths])[None]
        out = backbone(input_ids=ids[None], position_ids=positions, attention_mask=None, use_cache=False)
        packed = out.last_hidden_state[0]
    finally:
        backbone.train(was_training)
    return torch.allclose(packed.float(), torch.cat(alone), atol=1e-4, rtol=1e-3)


def use_packing(padding_free: bool | None, model, backbone, field: str = "padding_free") -> bool:
    """Whether the forwards of `model` run packed: `padding_free` None (auto) packs where the attention is varlen
    (flash-attn), True wherever the model allows it, False never. A refused request warns and falls back."""
    if padding_free is False:
        return False
    config = _text_config(model)
    varlen = getattr(config, "_attn_implementation", None) in VARLEN_ATTENTION
    if padding_free is None and not varlen:
        return False
    why = refusal(model, backbone)
    if why is not None:
        warnings.warn(f"{field}: {config.model_type} is run on trimmed micro-batches, not packed: {why}", stacklevel=2)
        return False
    return True
