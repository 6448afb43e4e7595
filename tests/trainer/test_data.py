import json

import pytest

from fastppo.data import PromptSampler, read_prompts, tokenize_prompts
from fastppo.errors import InputError
from tests.trainer.conftest import build_tokenizer


def write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_jsonl_prompts_and_chat_messages(tmp_path):
    tokenizer = build_tokenizer()
    path = write_jsonl(tmp_path / "p.jsonl", [
        json.dumps({"prompt": "w1 w2"}),
        "",
        json.dumps({"messages": [{"role": "user", "content": "w3"}]}),
    ])  # fmt: skip
    prompts = read_prompts(path, tokenizer)
    assert prompts == ["w1 w2", "<bos>user: w3 <|im_end|> assistant:"]
    assert prompts[1].messages == [{"role": "user", "content": "w3"}]  # kept for a reward model's own template


def test_one_bos_whether_or_not_the_template_renders_it(tmp_path):
    """A Llama-3 style template renders BOS itself: tokenizing it with special tokens again would add a second."""
    tokenizer = build_tokenizer()
    path = write_jsonl(tmp_path / "p.jsonl", [json.dumps({"messages": [{"role": "user", "content": "w3"}]}),
                                              json.dumps({"prompt": "w1 w2"})])  # fmt: skip
    ids, mask = tokenize_prompts(read_prompts(path, tokenizer), tokenizer, 32)
    for row, row_mask in zip(ids, mask, strict=True):
        real = row[row_mask.bool()].tolist()
        assert real[0] == tokenizer.bos_token_id and real.count(tokenizer.bos_token_id) == 1, real


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"prompt": "w1"}', '{"prompt": "w2"'], r"p.jsonl:2: not valid JSON"),
        (['{"prompt": "w1"}', '{"text": "w2"}'], r"p.jsonl:2: expected"),
        ([""], "no prompts"),
    ],
)
def test_malformed_jsonl_names_file_and_line(tmp_path, lines, message):
    path = write_jsonl(tmp_path / "p.jsonl", lines)
    with pytest.raises(InputError, match=message):
        read_prompts(path, build_tokenizer())


def test_left_padding_and_truncation():
    tokenizer = build_tokenizer()
    ids, mask = tokenize_prompts(["w1 w2 w3", "w4"], tokenizer, max_length=8)
    assert mask.tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]  # BOS w1 w2 w3 / BOS w4
    assert ids[1, -1].item() == tokenizer.convert_tokens_to_ids("w4")
    with pytest.warns(UserWarning, match="longer than max_prompt_length"):
        ids, _ = tokenize_prompts(["w1 w2 w3"], tokenizer, max_length=3)
    assert ids.tolist() == [tokenizer.convert_tokens_to_ids(["<bos>", "w2", "w3"])]  # cut from the left, BOS kept
    with pytest.raises(InputError, match="max_prompt_length"):
        tokenize_prompts(["w1 w2 w3"], tokenizer, max_length=2, truncate=False)


def test_sampler_covers_each_prompt_once_per_epoch_and_resumes():
    sampler = PromptSampler(10, seed=3)
    first = sampler.next_indices(4) + sampler.next_indices(4)
    state = sampler.state_dict()
    rest = sampler.next_indices(6)
    assert sorted(first + rest[:2]) == list(range(10))
    resumed = PromptSampler(10, seed=3)
    resumed.load_state_dict(state)
    assert resumed.next_indices(6) == rest
