"""PolicyValueModel: log-probs equal the plain LM's on every architecture; one backbone; quantized references;
directories that hold something else than asked (another model class, an adapter, remote code) refused."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from fastppo.engines.hf import generate
from fastppo.models import (
    PolicyValueModel,
    frozen_reference,
    load_frozen,
    load_pretrained,
    load_trainable_lm,
    reference_logprobs,
)
from fastppo.runtime.errors import InputError
from tests.tiny_models import RELEASE_DTYPE, build_tokenizer, save_tiny_models

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see tests/conftest.py

ARCHS = ["llama", "qwen2", "gpt2", "gpt_neox"]


def padded_batch(tokenizer, lm):
    """Left-padded prompts of different lengths, and responses sampled by the model (right-padded)."""
    from fastppo.data import tokenize_prompts

    prompt_ids, prompt_mask = tokenize_prompts(["w1 w2 w3", "w4", "w5 w6"], tokenizer, max_length=8)
    torch.manual_seed(0)
    response_ids, response_mask, *_ = generate(lm, tokenizer, prompt_ids, prompt_mask, max_new_tokens=5)
    return prompt_ids, prompt_mask, response_ids, response_mask


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "logits"])
def test_logprobs_match_the_plain_model_per_sequence(tiny_models, arch, fused):
    """Scoring a padded batch gives each sequence the log-probs the LM gives it alone, unpadded."""
    tokenizer = build_tokenizer()
    lm = AutoModelForCausalLM.from_pretrained(tiny_models[arch][0], dtype=torch.float32)
    model = PolicyValueModel(lm, fused_logprobs=fused)
    prompt_ids, prompt_mask, response_ids, response_mask = padded_batch(tokenizer, lm)
    P = prompt_ids.shape[1]
    input_ids = torch.cat([prompt_ids, response_ids], 1)
    attention_mask = torch.cat([prompt_mask, response_mask], 1)
    logprobs, entropy, values = model(input_ids, attention_mask, P, temperature=0.7)
    assert logprobs.shape == entropy.shape == values.shape == response_ids.shape
    for row in range(3):
        ids = input_ids[row][attention_mask[row].bool()].unsqueeze(0)
        n_prompt = int(prompt_mask[row].sum())
        logits = lm(ids).logits[0, n_prompt - 1 : -1] / 0.7
        expected = torch.log_softmax(logits.double(), -1).gather(-1, ids[0, n_prompt:, None]).squeeze(-1)
        n = int(response_mask[row].sum())
        torch.testing.assert_close(logprobs[row, :n].double(), expected, atol=1e-4, rtol=1e-4)
    ref = reference_logprobs(lm, input_ids, attention_mask, P, 0.7, fused)
    torch.testing.assert_close(ref, logprobs)


def test_shared_critic_holds_one_backbone(tiny_models):
    lm = AutoModelForCausalLM.from_pretrained(tiny_models["llama"][0], dtype=torch.float32)
    n_lm = sum(p.numel() for p in lm.parameters())
    shared = PolicyValueModel(lm, critic="shared")
    hidden = lm.config.hidden_size
    assert sum(p.numel() for p in shared.parameters()) == n_lm + hidden + 1  # + value head only
    ids = {id(p) for p in shared.parameters()}
    assert len(ids) == len(list(shared.parameters()))
    lm = AutoModelForCausalLM.from_pretrained(tiny_models["llama"][0], dtype=torch.float32)
    separate = PolicyValueModel(lm, critic="separate")
    n_backbone = sum(p.numel() for p in separate.critic_backbone.parameters())
    assert sum(p.numel() for p in separate.parameters()) == n_lm + n_backbone + hidden + 1


def _bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


@pytest.mark.parametrize("arch", ARCHS)
def test_frozen_models_keep_the_checkpoints_dtype_and_compute_as_float32(tiny_models, arch):
    """On CPU the reference and the reward model hold a bf16/fp16 checkpoint's matrices as stored (about half the
    bytes of a float32 copy) and give bitwise the outputs of the model converted to float32."""
    cpu, stored = torch.device("cpu"), RELEASE_DTYPE[arch]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 90, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding in one row
    for auto_class, path in (
        (AutoModelForCausalLM, tiny_models[arch][0]),
        (AutoModelForSequenceClassification, tiny_models[arch][1]),
    ):
        fp32 = load_pretrained(auto_class, path, "none", cpu, torch.float32).eval()
        frozen = load_frozen(auto_class, path, "none", cpu)
        assert {p.dtype for p in frozen.parameters()} >= {stored}
        assert all(not p.requires_grad for p in frozen.parameters())
        ratio = _bytes(frozen) / _bytes(fp32)
        assert ratio == 1.0 if stored == torch.float32 else ratio < 0.6
        with torch.no_grad():
            assert torch.equal(
                frozen(input_ids=ids, attention_mask=mask).logits, fp32(input_ids=ids, attention_mask=mask).logits
            )
            # under bf16 autocast (precision: bf16) a bf16 matrix is read as stored, not upcast and rounded back:
            # the same products as the float32 model's under autocast
            with torch.autocast("cpu", dtype=torch.bfloat16):
                low = frozen(input_ids=ids, attention_mask=mask).logits
                torch.testing.assert_close(low, fp32(input_ids=ids, attention_mask=mask).logits, atol=1e-6, rtol=0)
                linear = next(m for m in frozen.modules() if isinstance(m, torch.nn.Linear))
                assert linear.weight.dtype == (torch.bfloat16 if stored == torch.bfloat16 else torch.float32)
    # the reference copied from the policy (no reference path given) goes back to the checkpoint's dtype exactly
    lm, checkpoint_dtype = load_trainable_lm(tiny_models[arch][0], cpu)
    lm.eval()
    reference = frozen_reference(lm, lm, "none", cpu, checkpoint_dtype)
    assert {p.dtype for p in reference.parameters()} >= {stored}
    assert torch.equal(
        reference_logprobs(reference, ids, mask, 4, 1.0, True), reference_logprobs(lm, ids, mask, 4, 1.0, True)
    )


def test_4bit_reference_is_under_a_third_of_fp32(tmp_path):
    policy, _ = save_tiny_models(tmp_path, "llama", hidden=256, layers=4)
    fp32 = load_pretrained(AutoModelForCausalLM, policy, "none", torch.device("cpu"), torch.float32)
    nf4 = load_pretrained(AutoModelForCausalLM, policy, "4bit", torch.device("cpu"))
    assert nf4.get_memory_footprint() < fp32.get_memory_footprint() / 3
    int8 = load_pretrained(AutoModelForCausalLM, policy, "8bit", torch.device("cpu"))
    assert int8.get_memory_footprint() < fp32.get_memory_footprint() / 2
    # and the quantized reference still scores: finite log-probs close to the fp32 model's
    tokenizer = build_tokenizer()
    prompt_ids, prompt_mask, response_ids, response_mask = padded_batch(tokenizer, fp32)
    input_ids = torch.cat([prompt_ids, response_ids], 1)
    attention_mask = torch.cat([prompt_mask, response_mask], 1)
    exact = reference_logprobs(fp32, input_ids, attention_mask, prompt_ids.shape[1], 1.0, True)
    approx = reference_logprobs(nf4, input_ids, attention_mask, prompt_ids.shape[1], 1.0, True)
    assert torch.isfinite(approx).all()
    assert (approx - exact)[response_mask.bool()].abs().mean() < 0.5


# --- a directory holding another model class, an adapter, remote code: refused, never a random head --------------


def with_config(tmp_path, source: str, name: str, **changes) -> str:
    """A copy of the model directory `source` whose config.json has `changes`."""
    import json
    import shutil

    target = tmp_path / name
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps(config | changes))
    return str(target)


def test_a_sequence_classifier_as_the_policy_is_refused_naming_the_random_head(tiny_models):
    classifier = tiny_models["llama"][1]
    with pytest.raises(InputError, match=r"LlamaForSequenceClassification .*lm_head\.weight would be initialized"):
        load_trainable_lm(classifier, torch.device("cpu"))


def test_a_causal_lm_with_one_label_as_the_reward_model_is_refused(tiny_models, tmp_path):
    """num_labels: 1 passes the label check; its `score` head would still be random."""
    from fastppo.ppo.config import PPOConfig
    from fastppo.ppo.rewards import load_reward

    one_label = with_config(tmp_path, tiny_models["llama"][0], "lm", id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    with pytest.raises(
        InputError, match=r"LlamaForCausalLM .*score\.weight would be initialized.*fastppo reward-model"
    ):
        load_reward(one_label, PPOConfig(), build_tokenizer(), torch.device("cpu"))


def test_tied_embeddings_are_not_missing_weights(tiny_models):
    """GPT-2's LM head is its input embedding: a GPT-2 classifier's directory holds every weight of the LM."""
    lm, _ = load_trainable_lm(tiny_models["gpt2"][1], torch.device("cpu"))
    assert lm.lm_head.weight is lm.transformer.wte.weight


def test_a_lora_adapter_directory_says_what_it_is_and_how_to_use_it(tiny_models, tmp_path):
    from peft import LoraConfig, get_peft_model

    from fastppo.runtime.validation import check_model_dir

    policy = tiny_models["llama"][0]
    lm = AutoModelForCausalLM.from_pretrained(policy)
    get_peft_model(lm, LoraConfig(r=4, target_modules="all-linear")).save_pretrained(tmp_path / "adapter")
    adapter = str(tmp_path / "adapter")
    expected = rf"policy_model: {adapter} is a LoRA adapter \(adapter_config.json, rank 4\) of {policy}, .*merge"
    with pytest.raises(InputError, match=expected.replace("merge", "Merge it into its base")):
        check_model_dir("policy_model", adapter)
    with pytest.raises(InputError, match="is a LoRA adapter"):
        load_trainable_lm(adapter, torch.device("cpu"))


def test_a_model_needing_remote_code_is_refused_plainly(tmp_path):
    """No prompt, no 'pass trust_remote_code=True' (an option fastppo does not have)."""
    custom = tmp_path / "custom"
    custom.mkdir()
    auto_map = {"AutoConfig": "configuration_my.MyConfig", "AutoModelForCausalLM": "modeling_my.MyModel"}
    (custom / "config.json").write_text(f'{{"model_type": "fastppo_custom", "auto_map": {json.dumps(auto_map)}}}')
    with pytest.raises(InputError, match="fastppo runs no code from a model directory: it has no trust_remote_code"):
        load_trainable_lm(str(custom), torch.device("cpu"))
