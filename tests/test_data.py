import json
import sys
import warnings

import pytest

from fastppo.data import PromptSampler, check_prompt_token_ids, encode, encode_all, read_prompts, tokenize_prompts
from fastppo.runtime.errors import InputError
from tests.tiny_models import build_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see tests/conftest.py


def write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_jsonl_prompts_and_chat_messages(tmp_path):
    tokenizer = build_tokenizer()
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [
            json.dumps({"prompt": "w1 w2"}),
            "",
            json.dumps({"messages": [{"role": "user", "content": "w3"}]}),
        ],
    )
    prompts = read_prompts(path, tokenizer)
    assert prompts == ["w1 w2", "<bos>user: w3 <|im_end|> assistant:"]
    assert prompts[1].messages == [{"role": "user", "content": "w3"}]  # kept for a reward model's own template


def test_one_bos_whether_or_not_the_template_renders_it(tmp_path):
    """A Llama-3 style template renders BOS itself: tokenizing it with special tokens again would add a second."""
    tokenizer = build_tokenizer()
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [json.dumps({"messages": [{"role": "user", "content": "w3"}]}), json.dumps({"prompt": "w1 w2"})],
    )
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


def long_prompt_file(tmp_path, long_line: int = 12, n_lines: int = 14, words: int = 39):
    """A prompts JSONL whose line `long_line` is BOS + `words` tokens; the others are short."""
    lines = [json.dumps({"prompt": f"w{i} w{i + 1}"}) for i in range(1, n_lines + 1)]
    lines[long_line - 1] = json.dumps({"prompt": " ".join(f"w{i % 90}" for i in range(words))})
    return write_jsonl(tmp_path / "prompts.jsonl", lines)


def test_without_truncation_every_prompt_is_checked_when_read(tmp_path):
    """truncate_long_prompts: false names the file and line at load, not the batch index at the step that draws it."""
    path = long_prompt_file(tmp_path)
    message = r"prompts.jsonl:12: the prompt is 40 tokens, max_prompt_length is 16 \(truncate_long_prompts: false\)"
    with pytest.raises(InputError, match=message):
        read_prompts(path, build_tokenizer(), max_length=16, truncate=False)
    with pytest.raises(InputError, match=r"prompts\[1\]: the prompt is 4 tokens, max_prompt_length is 3"):
        read_prompts(["w1 w2", "w1 w2 w3", "w1 w2 w3 w4"], build_tokenizer(), max_length=3, truncate=False)
    assert len(read_prompts(path, build_tokenizer(), max_length=40, truncate=False)) == 14  # 40 tokens fit
    assert len(read_prompts(path, build_tokenizer(), max_length=16)) == 14  # truncation on: cut per batch, later


def test_a_chat_prompt_is_measured_as_rendered(tmp_path):
    """The length checked is the rendered template's, BOS included once: what the rollout will feed the model."""
    path = write_jsonl(tmp_path / "p.jsonl", [json.dumps({"messages": [{"role": "user", "content": "w3 w4"}]})])
    tokenizer = build_tokenizer()
    assert read_prompts(path, tokenizer, max_length=6, truncate=False)  # <bos> user: w3 w4 <|im_end|> assistant:
    with pytest.raises(InputError, match=r"p.jsonl:1: the prompt is 6 tokens, max_prompt_length is 5"):
        read_prompts(path, tokenizer, max_length=5, truncate=False)


def test_a_batch_too_long_names_the_prompts_file_and_line(tmp_path):
    """Callers that tokenize without checking at load (DPO) still get the prompt's file:line, not its batch index."""
    tokenizer = build_tokenizer()
    prompts = read_prompts(long_prompt_file(tmp_path), tokenizer)
    with pytest.raises(InputError, match=r"prompts.jsonl:12: the prompt is 40 tokens, max_prompt_length is 16"):
        tokenize_prompts([prompts[0], prompts[11]], tokenizer, max_length=16, truncate=False)
    with pytest.raises(InputError, match=r"batch prompt #1: the prompt is 4 tokens, max_prompt_length is 3"):
        tokenize_prompts(["w1", "w1 w2 w3"], tokenizer, max_length=3, truncate=False)


def test_a_probe_that_cuts_prompts_on_purpose_does_not_warn():
    """The trainer's start-up probe cuts prompts to 32 tokens for speed: that is no truncation of the user's prompts,
    and with truncate_long_prompts: false a warning that 'kept the last tokens' would contradict the setting."""
    tokenizer = build_tokenizer()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ids, _ = tokenize_prompts(["w1 w2 w3"], tokenizer, max_length=3, warn=False)
    assert ids.tolist() == [tokenizer.convert_tokens_to_ids(["<bos>", "w2", "w3"])]


def test_encode_all_matches_encode(tmp_path):
    tokenizer = build_tokenizer()
    records = [{"messages": [{"role": "user", "content": "w3"}]}, {"prompt": "w1 w2"}, {"prompt": "<bos> w5"}]
    path = write_jsonl(tmp_path / "p.jsonl", [json.dumps(record) for record in records])
    prompts = read_prompts(path, tokenizer)
    assert encode_all(tokenizer, prompts) == [encode(tokenizer, p) for p in prompts]
    assert encode_all(tokenizer, []) == []


def tokenizer_with_a_token_the_model_lacks():
    """The tiny models' tokenizer (97 tokens, the models' vocab_size) with `<tool>` added as id 97, the embeddings
    not resized: the model has no row for it."""
    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_end|>", "<tool>"]})
    assert tokenizer.convert_tokens_to_ids("<tool>") == 97 == len(tokenizer) - 1
    return tokenizer


def test_a_prompt_token_beyond_the_models_vocabulary_is_named(tmp_path, tiny_models):
    from transformers import AutoModelForCausalLM

    tokenizer = tokenizer_with_a_token_the_model_lacks()
    path = write_jsonl(tmp_path / "prompts.jsonl", [json.dumps({"prompt": p}) for p in ("w1 w2", "w3 <tool> w4")])
    prompts = read_prompts(path, tokenizer)
    lm = AutoModelForCausalLM.from_pretrained(tiny_models["llama"][0])
    vocab_size = lm.get_input_embeddings().num_embeddings
    ids, mask = tokenize_prompts(prompts, tokenizer, 16)
    with pytest.raises(IndexError):  # what the rollout hits without the check
        lm(input_ids=ids, attention_mask=mask)
    message = r"prompts.jsonl:2: token '<tool>' is id 97, beyond the model's vocab_size 97 \(its input embeddings\)"
    with pytest.raises(InputError, match=message):
        check_prompt_token_ids(prompts, tokenizer, vocab_size)
    with pytest.raises(InputError, match=r"prompts\[1\]: token '<tool>' is id 97"):
        check_prompt_token_ids(["w1", "<tool>"], tokenizer, vocab_size)
    check_prompt_token_ids(prompts[:1], tokenizer, vocab_size)  # no prompt holds it: nothing to fix
    check_prompt_token_ids(prompts, tokenizer, vocab_size + 1)


def test_token_ids_are_not_tokenized_again_when_every_id_fits():
    """The common case costs no pass over the prompts: no id of the tokenizer's is beyond the model's vocabulary."""
    tokenizer = build_tokenizer()
    calls = []
    tokenizer_call = type(tokenizer).__call__

    class Counting(type(tokenizer)):
        def __call__(self, *args, **kwargs):
            calls.append(args)
            return tokenizer_call(self, *args, **kwargs)

    tokenizer.__class__ = Counting
    check_prompt_token_ids(["w1 w2", "w3"], tokenizer, 97)
    assert calls == []


def test_a_pad_token_beyond_the_models_vocabulary_is_named():
    """A pad token added to the tokenizer (the usual fix for a model without one) without resizing the embeddings:
    padding feeds its id to the embedding, whatever the prompts hold."""
    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    with pytest.raises(InputError, match=r"the tokenizer's pad token '\[PAD\]' is id 97, beyond the model's vocab_s"):
        check_prompt_token_ids(["w1"], tokenizer, 97)


def test_an_end_id_the_model_cannot_sample_is_warned_about():
    """An end-of-turn id beyond the model's logits can never be sampled: responses would not end there."""
    tokenizer = build_tokenizer()
    with pytest.warns(UserWarning, match=r"end-of-response token id\(s\) \[120\] .* vocab_size 97"):
        check_prompt_token_ids(["w1"], tokenizer, 97, end_ids=[1, 4, 120])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_prompt_token_ids(["w1"], tokenizer, 97, end_ids=[1, 4])


# --- TRL's dataset formats ---------------------------------------------------------------------------------------

ROWS = [  # content as parts in both rows: a datasets column (Arrow) holds one type
    {"prompt": [{"role": "user", "content": [{"type": "text", "text": "w1 w2"}]}], "answer": "w3", "level": 1},
    {
        "prompt": [{"role": "user", "content": [{"type": "text", "text": "w4 "}, {"type": "text", "text": "w5"}]}],
        "answer": "w6",
        "level": 2,
    },
]
RENDERED = ["<bos>user: w1 w2 <|im_end|> assistant:", "<bos>user: w4 w5 <|im_end|> assistant:"]


def check_rows(prompts):
    """TRL's conversational rows: rendered with the template (content parts joined, never their Python repr), the
    messages kept as given, every other column kept for the reward functions."""
    assert prompts == RENDERED
    assert [p.messages for p in prompts] == [row["prompt"] for row in ROWS]
    assert [p.columns for p in prompts] == [{"answer": "w3", "level": 1}, {"answer": "w6", "level": 2}]


def test_trl_jsonl_formats(tmp_path):
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [json.dumps(row) for row in ROWS] + [json.dumps({"prompt": "w7", "answer": "w8", "completion": "w8"})],
    )
    prompts = read_prompts(path, build_tokenizer())
    check_rows(prompts[:2])
    assert prompts[2] == "w7" and prompts[2].columns == {"answer": "w8"}  # a reference completion is not passed on
    assert prompts[0].where == f"{path}:1"


def test_a_datasets_dataset_a_dataset_dict_a_saved_directory_and_parquet(tmp_path):
    datasets = pytest.importorskip("datasets")
    tokenizer = build_tokenizer()
    dataset = datasets.Dataset.from_list(ROWS)
    check_rows(read_prompts(dataset, tokenizer))
    splits = datasets.DatasetDict({"train": dataset, "test": dataset.select([0])})
    check_rows(read_prompts(splits, tokenizer))
    assert read_prompts(splits, tokenizer, split="test") == RENDERED[:1]
    with pytest.raises(InputError, match=r"prompts_split: prompts has no split 'valid' \(it has train, test\)"):
        read_prompts(splits, tokenizer, split="valid")
    dataset.save_to_disk(tmp_path / "saved")
    check_rows(read_prompts(str(tmp_path / "saved"), tokenizer))
    splits.save_to_disk(tmp_path / "splits")
    assert read_prompts(str(tmp_path / "splits"), tokenizer, split="test") == RENDERED[:1]
    dataset.to_parquet(tmp_path / "p.parquet")
    check_rows(read_prompts(str(tmp_path / "p.parquet"), tokenizer))
    with pytest.raises(InputError, match=f'{tmp_path / "p.parquet"} row 1: messages\\[0\\] needs a "content"'):
        bad = datasets.Dataset.from_list(
            [{"messages": [{"role": "user", "content": "w1"}]}, {"messages": [{"role": "user"}]}]
        )
        bad.to_parquet(tmp_path / "p.parquet")
        read_prompts(str(tmp_path / "p.parquet"), tokenizer)
    with pytest.raises(InputError, match=r"needs a 'prompt' or 'messages' column; its columns are \['text'\]"):
        read_prompts(datasets.Dataset.from_list([{"text": "w1"}]), tokenizer)


@pytest.mark.parametrize(
    "source, message",
    [
        ([{"prompt": "w1", "messages": [{"role": "user", "content": "w2"}]}], r"prompts\[0\]: expected .* found both"),
        ([[{"role": "user", "content": [{"type": "image"}]}]], r"prompts\[0\]: messages\[0\]: a content part must be"),
        ([{"prompt": []}], r'prompts\[0\]: "prompt" must be a non-empty list'),
        ([3], r"prompts\[0\] must be a non-empty string, a list of chat messages or a record"),
    ],
)
def test_records_that_are_not_prompts_are_named(source, message):
    with pytest.raises(InputError, match=message):
        read_prompts(source, build_tokenizer())


def test_a_directory_that_is_not_a_dataset_and_a_split_without_splits_are_refused(tmp_path):
    (tmp_path / "notes").mkdir()
    with pytest.raises(InputError, match="is a directory but not a dataset written by save_to_disk"):
        read_prompts(str(tmp_path / "notes"), build_tokenizer())
    path = write_jsonl(tmp_path / "p.jsonl", ['{"prompt": "w1"}'])
    with pytest.raises(InputError, match="prompts_split: 'test' selects a split of a DatasetDict"):
        read_prompts(path, build_tokenizer(), split="test")


def test_without_the_datasets_extra_its_forms_are_refused_naming_it(tmp_path, monkeypatch):
    for name in ("datasets", "pyarrow", "pyarrow.parquet"):
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed: importing it raises ImportError
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "dataset_info.json").write_text("{}")
    (tmp_path / "p.parquet").write_bytes(b"PAR1")
    for source in (tmp_path / "saved", tmp_path / "p.parquet"):
        with pytest.raises(InputError, match=r"needs the datasets package: pip install 'fastppo\[datasets\]'"):
            read_prompts(str(source), build_tokenizer())
    assert read_prompts(write_jsonl(tmp_path / "p.jsonl", ['{"prompt": "w1"}'])) == ["w1"]  # JSONL needs nothing


def test_content_given_as_parts_renders_as_its_text(tmp_path):
    """A text-only template renders `content` as given: a list of parts would become its Python repr."""
    parts = [{"type": "text", "text": "w3 "}, {"type": "text", "text": "w4"}]
    lines = [json.dumps({"messages": [{"role": "user", "content": c}]}) for c in (parts, "w3 w4")]
    with_parts, with_text = read_prompts(write_jsonl(tmp_path / "p.jsonl", lines), build_tokenizer())
    assert with_parts == with_text == "<bos>user: w3 w4 <|im_end|> assistant:"
