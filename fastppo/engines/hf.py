"""Generation and the rollout batch that travels through one PPO iteration.

`generate` is a plain decode loop over the backbone's KV cache (preallocated for the whole rollout where the model
supports it): one prefill of the left-padded prompts, then one token per step for the whole batch, with
temperature / top-k / top-p sampling, stopping rows at EOS or a stop string and the batch when every row has
stopped. It avoids `model.generate`'s per-step machinery (logits processors, stopping criteria objects, cache
bookkeeping) and applies the LM head to the last position only; on a CPU, Llama-family models take their decode
steps from `lean_decode` (the same arithmetic in fewer ops). It yields what PPO needs directly: the response
mask, the end flags, and, since each step's hidden state is the one that predicts its token, the sampled tokens'
log-probs and (with a value head) the values at rollout time, so the trainer need not run the policy over the batch
again (`old_logprobs: auto`). The rollout's share of an iteration is in the end-to-end tables of bench/README.md.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from typing import NamedTuple

import torch

from fastppo import ops
from fastppo.engines.lean_decode import DecodeLinear, LeanDecoder
from fastppo.models import backbone_of, model_logits, plain_linear, position_ids_for, unwrap


def warn_if_truncated_sampling(top_k: int, top_p: float) -> None:
    if top_k > 0 or top_p < 1.0:
        warnings.warn(
            "top_k/top_p sample from a truncated distribution, but every log-prob PPO uses (old, new, reference) "
            "is of the full one: the update is slightly off-policy and the KL is underestimated. Prefer "
            "temperature alone for RL.",
            stacklevel=3,
        )


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, uniforms=None):
    """(tokens, logprobs): (B,) next tokens from (B, V) logits, and their (B,) log-probs at `temperature` from the
    sampler when it drew from the full distribution (None when greedy, temperature 0, or truncated by top-k /
    top-p: PPO's log-probs are the full distribution's, which the caller then computes). `uniforms` (B,): the
    draws in [0, 1) that pick the tokens, `torch.rand(B)` when not given."""
    if temperature == 0:
        return logits.argmax(-1), None
    truncated = top_k > 0 or top_p < 1.0
    if truncated:  # mask the dropped tokens to -inf on the tempered logits, then sample those
        logits, temperature = logits.float() / temperature, 1.0
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    # Inverse-CDF sampling (see ops.sample_tokens): torch.multinomial and an exponential race (argmax p / E) each cost
    # about a whole decode step of the bench's model on CPU logits; the native kernel reads the logits three times and
    # writes nothing but the tokens and their log-probs (the sample_tokens rows of bench/README.md).
    if uniforms is None:
        uniforms = torch.rand(logits.shape[0], device=logits.device)
    tokens, logprobs = ops.sample_tokens(logits, uniforms, temperature)
    if bool((tokens < 0).any()):
        rows = (tokens < 0).nonzero().flatten().tolist()
        raise FloatingPointError(
            f"the policy's next-token logits are not a distribution (nan, +inf or all -inf) in rows {rows[:5]}: "
            "the model's weights or activations are no longer finite"
        )
    return tokens, None if truncated else logprobs


def _cache_name(backbone) -> str:
    """The KV-cache argument's name: transformers 5 renamed `past_key_values` to `cache`."""
    return "cache" if "cache" in inspect.signature(backbone.forward).parameters else "past_key_values"


def end_token_ids(tokenizer, lm=None, extra: tuple = ()) -> list[int]:
    """The ids that end a response: the tokenizer's EOS, every id of the model's `generation_config.eos_token_id`
    (chat models end turns with `<|im_end|>`, `<|eot_id|>`... listed there beside the base EOS) and `extra`."""
    ids = [tokenizer.eos_token_id]
    generation_config = getattr(unwrap(lm), "generation_config", None) if lm is not None else None
    configured = getattr(generation_config, "eos_token_id", None)
    ids += configured if isinstance(configured, (list, tuple)) else [configured]
    ids += list(extra)
    return sorted({int(i) for i in ids if i is not None})


class DecodeLayout:
    """CPU only: while decoding, nn.Linear layers multiply their `rows`-row inputs by a copy of their weight
    prepared once for it in `dtype` (`DecodeLinear`: packed for the GEMM, which otherwise repacks every weight on
    every step), prepared again by `for_rows` when finished rows leave the decode. The copies live for one rollout,
    about as big as the linear weights in `dtype` (the trainer frees the gradients before it, which are as big).
    The same products up to the dtype's rounding."""

    def __init__(self, module, rows: int, dtype: torch.dtype = torch.float32):
        on_cpu = next(module.parameters()).device.type == "cpu"
        self.patched = [m for m in module.modules() if plain_linear(m)] if on_cpu else []
        self.dtype = dtype
        self.for_rows(rows)

    def for_rows(self, rows: int) -> None:
        for module in self.patched:
            module.forward = DecodeLinear(module.weight, module.bias, rows, self.dtype)

    def __enter__(self) -> DecodeLayout:
        return self

    def __exit__(self, *exc) -> None:
        for module in self.patched:
            del module.forward  # the class's forward again


def static_cache(lm, max_length: int):
    """A KV cache preallocated for the whole rollout, written in place at each step, or None (transformers then
    grows a DynamicCache, which concatenates every layer's keys and values at every step: traffic quadratic in the
    response length). Models that declare `_can_compile_fullgraph` support it. Its full-attention layers attend
    over the filled prefix only (`_FilledPrefixLayer`)."""
    from transformers import StaticCache
    from transformers.cache_utils import StaticLayer

    model = unwrap(lm)
    if not getattr(model, "_can_compile_fullgraph", False):
        return None
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    cache = StaticCache(config=config, max_cache_len=max_length)
    for layer in cache.layers:  # sliding-window layers keep theirs: their buffer rolls once full, no prefix to cut
        if type(layer) is StaticLayer:
            layer.__class__ = _filled_prefix_layer()  # same buffers, same writes
    return cache


@functools.cache
def _filled_prefix_layer():
    from transformers.cache_utils import StaticLayer

    class _FilledPrefixLayer(StaticLayer):
        """A static cache layer whose attention reads the filled positions only: the stock one hands attention its
        whole buffer, and the mask hides the empty tail, so every step read the keys and values of max_length
        positions: at the large bench size a large share of the step's memory traffic beside the weights'
        (bench/README.md, the rollout rows). Same results: the tail's positions were masked out."""

        filled = 0  # positions written so far

        def update(self, key_states, value_states, *args, **kwargs):
            # One dtype for both buffers: under bf16 autocast the values come out of a bf16 matmul and the keys out
            # of the float32 rotary embedding, and transformers' versions differ in which dtype they allocate.
            dtype = self.keys.dtype if getattr(self, "is_initialized", False) else key_states.dtype
            key_states, value_states = key_states.to(dtype), value_states.to(dtype)
            keys, values = super().update(key_states, value_states, *args, **kwargs)
            self.filled += key_states.shape[-2]
            return keys[:, :, : self.filled], values[:, :, : self.filled]

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:  # asked before this step's update
            return self.filled + query_length, 0

    return _FilledPrefixLayer


# Finished rows leave the decode once this fraction of the rows still decoding has ended: their rows of the KV cache,
# the mask and the positions are dropped and the decode's weights prepared again for the smaller step. Each leaving
# costs about one pass over the weights (the repack) and saves the finished rows' share of every later step.
LEAVE_FRACTION = 0.25


class Generation(NamedTuple):
    response_ids: torch.Tensor  # (B, T) long, pad after the end
    response_mask: torch.Tensor  # (B, T) long, 1 = generated token (the end token included)
    ended: torch.Tensor  # (B,) bool: an end id or a stop string ended the row (else max_new_tokens cut it)
    logprobs: torch.Tensor | None  # (B, T) float32 the sampled tokens' log-probs at `temperature` (1 when greedy)
    values: torch.Tensor | None  # (B, T) float32 value_head of the hidden states, None without a value head
    decoded_tokens: int = 0  # rows x steps the decode computed, finished rows still in it included


def cpu_decode_dtype() -> torch.dtype:
    """The dtype of a CPU decode's matmuls: bf16 under the caller's bf16 autocast (precision: bf16, as its training
    computes), else float32."""
    bf16 = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    return torch.bfloat16 if bf16 else torch.float32


# On a CPU the decode's steps run with autocast off: its linear layers multiply prepared copies of their weights in
# the caller's autocast dtype (`DecodeLayout`, `LeanDecoder`), which autocast would convert again at every step; the
# prefill runs under the caller's autocast. CUDA autocast is left as the caller set it.
@torch.no_grad()
def generate(
    lm,
    tokenizer,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_strings: tuple = (),
    end_ids: list[int] | None = None,
    value_head=None,
    with_logprobs: bool = False,
) -> Generation:
    """Sample responses to left-padded prompts (see `Generation`), T <= max_new_tokens. A row ends at any of
    `end_ids` (default: `end_token_ids(tokenizer, lm)`), kept as its last token, or once its text holds a stop
    string; a row that does neither is truncated at max_new_tokens. With `with_logprobs` the sampled tokens'
    log-probs (of the full distribution, before top-k / top-p, as PPO's recomputed ones are), with `value_head`
    the values: each costs a pass per step, so only a caller that uses them asks."""
    from transformers import Cache

    dtype = cpu_decode_dtype()
    (B, P), device, pad_id = prompt_ids.shape, prompt_ids.device, tokenizer.pad_token_id
    end_ids = torch.tensor(end_ids if end_ids is not None else end_token_ids(tokenizer, lm), device=device)
    response_ids = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    response_mask = torch.zeros((B, max_new_tokens), dtype=torch.long, device=device)
    logprobs = torch.zeros((B, max_new_tokens), dtype=torch.float32, device=device) if with_logprobs else None
    values = torch.zeros((B, max_new_tokens), dtype=torch.float32, device=device) if value_head is not None else None
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    # The attention mask grows by one column per step: preallocated, viewed up to the current length.
    attention_mask = torch.cat([prompt_mask, prompt_mask.new_ones(B, max_new_tokens)], dim=1)
    position_ids = position_ids_for(prompt_mask)
    backbone = backbone_of(lm)
    cache_name = _cache_name(backbone)
    kv = static_cache(lm, P + max_new_tokens)
    lean = LeanDecoder.build(lm, kv, B, dtype)  # Llama-family on a CPU: steps without transformers' machinery
    active = torch.arange(B, device=device)  # (A,) the rows still decoding: the rows of every per-step tensor below
    steps = decoded_tokens = 0
    layout = DecodeLayout(lm if lean is None else unwrap(lm).get_output_embeddings(), B, dtype)
    with layout, torch.autocast("cpu", enabled=False):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            out = backbone(
                input_ids=prompt_ids,
                attention_mask=prompt_mask,
                position_ids=position_ids,
                use_cache=True,
                **{cache_name: kv},
            )
        kv = getattr(out, cache_name)  # the static cache itself, or the dynamic one transformers made
        if dtype != torch.float32:
            _keys_and_values_to_float32(kv)  # the autocast prefill wrote them in bf16; the steps write float32
        hidden = out.last_hidden_state[:, -1]  # (A, H): predicts the next token
        next_position = position_ids[:, -1:] + 1  # (A, 1)
        for t in range(max_new_tokens):
            logits = model_logits(lm, hidden)  # (A, V)
            decoded_tokens += len(active)
            # One draw for each of the B rows, running or not, as when every row stayed: the running rows' tokens
            # do not depend on when the others left.
            uniforms = torch.rand(B, device=device)[active] if temperature > 0 else None
            token, logprob = sample_next(logits, temperature, top_k, top_p, uniforms)
            done = finished[active]
            token = torch.where(done, torch.full_like(token, pad_id), token)
            response_ids[active, t] = token
            response_mask[active, t] = (~done).long()
            if logprobs is not None:  # from the sampler, or of the full distribution when it drew from another
                logprobs[active, t] = (
                    logprob if logprob is not None else ops.token_logprobs(logits, token, temperature or 1.0)
                )
            if values is not None:
                values[active, t] = value_head(hidden.to(value_head.weight.dtype)).squeeze(-1).float()
            finished[active] = done | torch.isin(token, end_ids)
            if stop_strings:
                finished |= _hit_stop_string(tokenizer, response_ids[:, : t + 1], finished, stop_strings)
            steps = t + 1
            if bool(finished.all()) or t == max_new_tokens - 1:
                break
            running = (~finished[active]).nonzero().flatten()  # positions in the step's tensors
            left = len(active) - len(running)
            if left and left >= LEAVE_FRACTION * len(active) and isinstance(kv, Cache):
                active, token, next_position = active[running], token[running], next_position[running]
                attention_mask = attention_mask[running]
                kv.reorder_cache(running)  # every transformers cache layer keeps the rows asked for (beam search)
                layout.for_rows(len(active))
                if lean is not None:
                    lean.for_rows(len(active))
            if lean is not None:
                hidden = lean.step(token, next_position, attention_mask[:, : P + t + 1])
            else:
                out = backbone(
                    input_ids=token.unsqueeze(1),
                    attention_mask=attention_mask[:, : P + t + 1],
                    position_ids=next_position,
                    use_cache=True,
                    **{cache_name: kv},
                )
                kv, hidden = getattr(out, cache_name), out.last_hidden_state[:, -1]
            next_position = next_position + 1
    logprobs, values = (None if x is None else x[:, :steps] for x in (logprobs, values))
    return Generation(response_ids[:, :steps], response_mask[:, :steps], finished, logprobs, values, decoded_tokens)


def _keys_and_values_to_float32(kv) -> None:
    for layer in getattr(kv, "layers", []):
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor) and tensor.dtype != torch.float32:
                setattr(layer, name, tensor.float())


def _hit_stop_string(tokenizer, response_ids, finished, stop_strings) -> torch.Tensor:
    """Rows whose text now ends with a stop string (only the tail is decoded: stop strings are short)."""
    hit = torch.zeros_like(finished)
    for row in (~finished).nonzero().flatten().tolist():
        tail = tokenizer.decode(response_ids[row, -16:], skip_special_tokens=True)
        hit[row] = any(s in tail for s in stop_strings)
    return hit


def decode_responses(tokenizer, response_ids: torch.Tensor, response_mask: torch.Tensor) -> list[str]:
    return [
        tokenizer.decode(ids[mask.bool()], skip_special_tokens=True)
        for ids, mask in zip(response_ids.cpu(), response_mask.cpu(), strict=True)
    ]
