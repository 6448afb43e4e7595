"""`fastppo sft`: JSONL errors name the line, the loss covers response tokens only, checkpoints reload."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fastppo.cli import main
from fastppo.demo.tokenizer import build_tokenizer
from fastppo.runtime.errors import InputError
from fastppo.runtime.validation import read_records
from fastppo.stages.common import encode_prompt_response
from fastppo.stages.sft import sft_batch

EXAMPLES = [
    {"prompt": "tell me about cats", "response": "the kitten is good"},
    {"prompt": "describe rain", "response": "the storm is very calm and puddle is bright"},
]


def write_lines(path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def response_logprob(model, tokenizer, prompt: str, response: str) -> float:
    ids, n_prompt = encode_prompt_response(tokenizer, prompt, response, max_length=64)
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=input_ids).logits[0, :-1].float(), -1)
    return logp[n_prompt - 1 :].gather(-1, input_ids[0, n_prompt:, None]).sum().item()


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "not valid JSON"),
        ('["a", "list"]', "expected a JSON object"),
        ('{"prompt": "tell me about cats"}', 'field "response" is missing'),
        ('{"prompt": "tell me about cats", "response": 3}', 'field "response" must be a string'),
    ],
)
def test_bad_line_names_file_and_line(tmp_path, line, message):
    path = write_lines(tmp_path / "data.jsonl", [json.dumps(EXAMPLES[0]), "", line])
    with pytest.raises(InputError, match=rf"data\.jsonl:3: .*{message}"):
        read_records(path, ("prompt", "response"))


def test_missing_or_empty_file(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_records(str(tmp_path / "absent.jsonl"), ("prompt", "response"))
    with pytest.raises(InputError, match="no records"):
        read_records(write_lines(tmp_path / "empty.jsonl", [""]), ("prompt", "response"))


def test_labels_cover_response_and_eos_only():
    tokenizer = build_tokenizer()
    batch = [encode_prompt_response(tokenizer, e["prompt"], e["response"], max_length=64) for e in EXAMPLES]
    input_ids, attention_mask, labels = sft_batch(batch, tokenizer.pad_token_id)
    for row, (ids, n_prompt) in enumerate(batch):
        response_ids = tokenizer(EXAMPLES[row]["response"], add_special_tokens=False)["input_ids"]
        assert ids[:n_prompt] == tokenizer(EXAMPLES[row]["prompt"])["input_ids"]
        assert labels[row, :n_prompt].eq(-100).all()
        assert labels[row, n_prompt : len(ids)].tolist() == [*response_ids, tokenizer.eos_token_id]
        assert labels[row, len(ids) :].eq(-100).all() and attention_mask[row, len(ids) :].eq(0).all()
        assert input_ids[row, len(ids) :].eq(tokenizer.pad_token_id).all()


def test_truncation_keeps_prompt_prefix():
    tokenizer = build_tokenizer()
    ids, n_prompt = encode_prompt_response(tokenizer, "tell me about cats", "the kitten is good", max_length=6)
    assert len(ids) == 6 and n_prompt == 5


def test_sft_command_learns_and_checkpoint_reloads(tmp_path, base_model):
    data = write_lines(tmp_path / "data.jsonl", [json.dumps(e) for e in EXAMPLES * 8])
    out = tmp_path / "sft"
    argv = ["sft", "--model", base_model, "--data", data, "--output-dir", str(out), "--epochs", "10"]
    assert main([*argv, "--learning-rate", "3e-3", "--batch-size", "8"]) == 0
    assert (out / "model.safetensors").is_file()

    tokenizer = AutoTokenizer.from_pretrained(out)
    before = AutoModelForCausalLM.from_pretrained(base_model)
    after = AutoModelForCausalLM.from_pretrained(out)
    for e in EXAMPLES:
        gain = response_logprob(after, tokenizer, **e) - response_logprob(before, tokenizer, **e)
        assert gain > 5.0, f"the response's log-probability rose by only {gain:.2f} nats"


def test_config_only_model_directory_is_initialised_from_config(tmp_path, base_model):
    config_only = tmp_path / "config_only"
    AutoModelForCausalLM.from_pretrained(base_model).config.save_pretrained(config_only)
    data = write_lines(tmp_path / "data.jsonl", [json.dumps(EXAMPLES[0])])
    out = tmp_path / "sft"
    argv = ["sft", "--model", str(config_only), "--tokenizer", base_model, "--data", data, "--output-dir", str(out)]
    assert main([*argv, "--epochs", "1"]) == 0
    assert AutoModelForCausalLM.from_pretrained(out).config.hidden_size == 64


def test_cli_reports_bad_input_with_exit_code_2(tmp_path, base_model, capsys):
    data = write_lines(tmp_path / "data.jsonl", [json.dumps(EXAMPLES[0]), '{"prompt": "x"}'])
    assert main(["sft", "--model", base_model, "--data", data, "--output-dir", str(tmp_path / "o")]) == 2
    assert "data.jsonl:2" in capsys.readouterr().err
    good = write_lines(tmp_path / "good.jsonl", [json.dumps(EXAMPLES[0])])
    assert main(["sft", "--model", str(tmp_path / "nope"), "--data", good, "--output-dir", str(tmp_path / "o")]) == 2
    assert "nope: no such model directory" in capsys.readouterr().err


def test_a_rendered_chat_prompt_gets_one_bos_as_ppo_encodes_it():
    """A Llama-3-style template renders BOS itself, and the tokenizer adds BOS to plain text: the supervised stages
    must not put a second one in front, or the policy is fine-tuned on another token layout than PPO trains on."""
    from fastppo.data import encode
    from tests.tiny_models import build_tokenizer as chat_tokenizer

    tokenizer = chat_tokenizer()
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "w1 w2"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.startswith(tokenizer.bos_token)
    ids, n_prompt = encode_prompt_response(tokenizer, prompt, "w3", max_length=64)
    assert ids[:n_prompt] == encode(tokenizer, prompt)
    assert ids[:n_prompt].count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id


def recorded_steps(monkeypatch, module) -> list[dict]:
    """The gradients each optimizer step of `module` applies (recorded, then the step runs)."""
    steps = []
    step = module.optimizer_step

    def recording(model, optimizer, scheduler):
        steps.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
        step(model, optimizer, scheduler)

    monkeypatch.setattr(module, "optimizer_step", recording)
    return steps


@pytest.mark.parametrize("micro", [{"micro_batch_size": 1}, {"micro_batch_size": 2}, {"micro_batch_tokens": 24}])
def test_micro_batches_accumulate_the_whole_batch_gradient(monkeypatch, base_model, micro):
    """Examples of different lengths in length-sorted micro-batches: the loss and the gradient of the step are the
    whole batch's (the mean over all its response tokens), not a mean of the micro-batches' means."""
    import fastppo.stages.sft as sft

    tokenizer = AutoTokenizer.from_pretrained(base_model)
    examples = [
        *EXAMPLES,
        {"prompt": "rain", "response": "calm"},
        {"prompt": "describe the kitten", "response": "good"},
    ]
    results = []
    for options in ({}, micro):
        steps = recorded_steps(monkeypatch, sft)
        model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
        summary = sft.train_sft(model, tokenizer, examples, epochs=1, batch_size=4, log=lambda line: None, **options)
        assert summary["steps"] == 1 and len(steps) == 1
        results.append((summary["loss"], steps[0]))
        monkeypatch.undo()
    (loss, grads), (micro_loss, micro_grads) = results
    assert micro_loss == pytest.approx(loss, rel=1e-5)
    assert grads.keys() == micro_grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(micro_grads[name], grad, atol=1e-6, rtol=1e-4, msg=name)
