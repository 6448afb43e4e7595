"""Prompts: reading them (JSONL, Parquet, TRL's datasets, lists), rendering chat messages, tokenizing them
left-padded, and a seeded, resumable sampler."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch

from fastppo.runtime.errors import InputError
from fastppo.runtime.validation import check_readable_file, clip, read_jsonl, require_text, short


class Prompt(str):
    """A prompt; `.where` names it for errors found after loading (its file:line, dataset row or list index) and
    `.columns` holds the other columns of its row (a dataset's `answer`...), which reward functions get by name."""

    where: str = ""
    columns: dict = {}  # shared and never mutated: every prompt read from data gets its own


class ChatPrompt(Prompt):
    """A prompt rendered from chat messages with the policy's template; `.messages` keeps them as given, so that a
    reward model with a template of its own can render the conversation its way and reward functions get them."""

    messages: list


def chat_prompt(text: str, messages: list) -> ChatPrompt:
    prompt = ChatPrompt(text)
    prompt.messages = messages
    return prompt


def prompt_location(prompt: str, index: int, of: str = "prompts") -> str:
    """How an error names a prompt: its file:line when read from a file, else its index in `of`."""
    return getattr(prompt, "where", None) or (f"prompts[{index}]" if of == "prompts" else f"{of} prompt #{index}")


# --- reading: records from every source, checked without a tokenizer ---------------------------------------------

# Columns of a row that are not passed on to reward functions: the prompt itself, and (as TRL does) a dataset's
# reference completion, which would be confused with the generated ones.
PROMPT_KEYS = ("prompt", "messages")
NOT_PASSED = (*PROMPT_KEYS, "completion", "completion_ids")
SOURCES = (
    "a JSONL file, a Parquet file, a dataset directory (save_to_disk), a datasets.Dataset, or a list of strings, "
    "chat conversations or records"
)


@dataclass
class PromptRecord:
    """One prompt as read: where it came from, the prompt (text or chat messages) and its row's other columns."""

    where: str
    prompt: str | list
    columns: dict


def read_prompt_records(source, split: str | None = None, field: str = "prompts") -> list[PromptRecord]:
    """Every prompt of `source`, checked, without a tokenizer (so a file is checked before anything loads).

    `source`: a JSONL file of {"prompt": ...} or {"messages": [...]} lines, a Parquet file or a dataset directory
    written by `save_to_disk` with the same columns, a `datasets.Dataset` (or `DatasetDict`: `split`, default
    "train"), or a list of prompt strings, conversations (lists of messages) or records. A prompt is text, or chat
    messages as TRL's conversational datasets hold them ("prompt": [{"role", "content"}...]); every other column of
    its row is kept for the reward functions. Errors name `field` (prompts, eval_prompts)."""
    if source is None:
        raise InputError(f"{field}: none given ({SOURCES})")
    if field == "eval_prompts" and _has_splits(source):
        # prompts_split names the training prompts' split, and the default is "train": read at either, held-out
        # prompts would be training prompts. eval_prompts are one split, as TRL's eval_dataset is.
        raise InputError(
            "eval_prompts: a dataset with splits (a DatasetDict, or a directory saved with them) would be read at "
            "the training prompts' split; pass the held-out split itself (dataset['test'], or a directory saved "
            "from it)"
        )
    if split is not None and not _has_splits(source):
        raise InputError(
            f"prompts_split: {split!r} selects a split of a DatasetDict (or of a dataset directory saved with "
            "splits); these prompts have none: remove prompts_split"
        )
    if isinstance(source, (list, tuple)):
        records = [record_of_item(f"{field}[{i}]", item) for i, item in enumerate(source)]
        name = "the prompt list"
    elif is_dataset(source):
        records, name = _dataset_records(source, field, split), "the dataset"
    elif isinstance(source, str) and os.path.isdir(source):
        records, name = _dataset_records(_load_from_disk(source), source, split), source
    elif isinstance(source, str) and source.endswith(".parquet"):
        records, name = _parquet_records(source), source
    elif isinstance(source, str):
        records = [_record_of_row(f"{source}:{number}", row) for number, row in read_jsonl(source, field)]
        name = source
    else:
        raise InputError(f"{field} must be {SOURCES}; got {type(source).__name__} {short(source)}")
    if not records:
        raise InputError(f"no prompts in {name}")
    return records


def record_of_item(where: str, item) -> PromptRecord:
    """A prompt given in a list: a string, a conversation (a list of messages) or a record (a dict)."""
    if isinstance(item, dict):
        return _record_of_row(where, item)
    if isinstance(item, list):
        return PromptRecord(where, _check_messages(where, "messages", item), {})
    if not isinstance(item, str) or not item.strip():
        raise InputError(f"{where} must be a non-empty string, a list of chat messages or a record, got {short(item)}")
    return PromptRecord(where, item, {})


def _record_of_row(where: str, row: dict) -> PromptRecord:
    keys = [key for key in PROMPT_KEYS if key in row]
    if len(keys) != 1:
        found = "both" if keys else "neither"
        raise InputError(f'{where}: expected {{"prompt": ...}} or {{"messages": [...]}}, found {found}')
    key = keys[0]
    value = row[key]  # "prompt": text or messages (TRL's conversational form); "messages": messages
    chat = isinstance(value, list) or key == "messages"
    prompt = _check_messages(where, key, value) if chat else require_text(where, key, value)
    return PromptRecord(where, prompt, {k: v for k, v in row.items() if k not in NOT_PASSED})


def _check_messages(where: str, key: str, messages) -> list:
    if not isinstance(messages, list) or not messages:
        raise InputError(f'{where}: "{key}" must be a non-empty list of {{"role", "content"}} objects')
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or not message["role"]:
            raise InputError(f'{where}: {key}[{i}] must be an object with a "role" string, got {short(message)}')
        content = message.get("content")
        if isinstance(content, list):
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise InputError(
                        f'{where}: {key}[{i}]: a content part must be {{"type": "text", "text": "..."}} (fastppo '
                        f"trains text models), got {short(part)}"
                    )
        elif not isinstance(content, str):
            raise InputError(f'{where}: {key}[{i}] needs a "content" string, got {short(content)}')
    return messages


def text_messages(messages: list) -> list:
    """The messages with every content given as parts ([{"type": "text", "text": ...}]) joined into one string, as
    text-only chat templates expect (they would render the list's Python repr); the parts' texts are joined
    without a separator, as templates that take parts render them."""
    return [
        {**m, "content": "".join(part["text"] for part in m["content"])} if isinstance(m["content"], list) else m
        for m in messages
    ]


# --- datasets: the `datasets` package (the optional extra fastppo[datasets]) --------------------------------------

DATASET_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")  # what save_to_disk writes


def is_dataset(source) -> bool:
    return type(source).__module__.split(".")[0] == "datasets"


def _has_splits(source) -> bool:
    if is_dataset(source):
        return type(source).__name__.endswith("DatasetDict")
    return isinstance(source, str) and os.path.isfile(os.path.join(source, "dataset_dict.json"))


def _import_datasets(what: str):
    try:
        import datasets
    except ImportError:
        raise InputError(f"prompts: {what} needs the datasets package: pip install 'fastppo[datasets]'") from None
    return datasets


def _load_from_disk(path: str):
    if not any(os.path.isfile(os.path.join(path, name)) for name in DATASET_FILES):
        raise InputError(
            f"prompts: {path} is a directory but not a dataset written by save_to_disk (no "
            f"{' / '.join(DATASET_FILES)}); prompts are {SOURCES}"
        )
    datasets = _import_datasets(f"{path} (a dataset directory)")
    try:
        return datasets.load_from_disk(path)
    except (OSError, ValueError) as error:
        raise InputError(f"prompts: cannot load the dataset in {path} ({clip(error)})") from None


def _dataset_records(dataset, name: str, split: str | None) -> list[PromptRecord]:
    kind = type(dataset).__name__
    if kind.startswith("Iterable"):
        raise InputError(f"prompts: {name} is an {kind} (streamed); load it without streaming=True")
    if kind.endswith("DatasetDict"):
        split = split or "train"
        if split not in dataset:
            raise InputError(
                f"prompts_split: {name} has no split {split!r} (it has {', '.join(dataset)}); set prompts_split"
            )
        dataset, name = dataset[split], f"{name}[{split!r}]"
    columns = list(dataset.column_names)
    if not any(key in columns for key in PROMPT_KEYS):
        raise InputError(f"prompts: {name} needs a 'prompt' or 'messages' column; its columns are {columns}")
    return [_record_of_row(f"{name} row {i}", row) for i, row in enumerate(dataset)]


def _parquet_records(path: str) -> list[PromptRecord]:
    check_readable_file("prompts", path)
    try:
        import pyarrow.parquet as parquet
    except ImportError:
        _import_datasets(f"{path} (Parquet)")  # pyarrow comes with datasets: this names the extra to install
        raise
    try:
        rows = parquet.read_table(path).to_pylist()
    except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
        raise InputError(f"prompts: cannot read {path} as Parquet ({clip(error)})") from None
    if rows and not any(key in rows[0] for key in PROMPT_KEYS):
        raise InputError(f"prompts: {path} needs a 'prompt' or 'messages' column; its columns are {list(rows[0])}")
    return [_record_of_row(f"{path} row {i}", row) for i, row in enumerate(rows)]


# --- rendering: records to the prompt strings the policy reads ----------------------------------------------------


def read_prompts(
    source,
    tokenizer=None,
    max_length: int | None = None,
    truncate: bool = True,
    split: str | None = None,
    field: str = "prompts",
) -> list[Prompt]:
    """The prompts of `source` (see `read_prompt_records`), chat messages rendered with the tokenizer's chat template
    ending with the assistant's turn. Every prompt is checked here, at load, not when a step draws it: a bad one is
    named by its index, row or file:line. With `truncate` False, that includes its length in tokens against
    `max_length` (truncate_long_prompts: false)."""
    prompts = [render(record, tokenizer) for record in read_prompt_records(source, split, field)]
    if not truncate and max_length is not None:
        if tokenizer is None:
            raise ValueError("read_prompts: checking prompt lengths needs the tokenizer")
        _check_lengths(prompts, encode_all(tokenizer, prompts), max_length)
    return prompts


def as_prompts(items, tokenizer) -> list[str]:
    """Prompts given to `generate` / `rollout`: strings (and prompts already read) as they are, conversations and
    records rendered as `read_prompts` renders them."""
    return [
        item if isinstance(item, str) else render(record_of_item(f"prompts[{i}]", item), tokenizer)
        for i, item in enumerate(items)
    ]


def render(record: PromptRecord, tokenizer) -> Prompt:
    if isinstance(record.prompt, str):
        prompt = Prompt(record.prompt)
    else:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise InputError(f"{record.where}: chat messages need a tokenizer with a chat template")
        try:
            text = tokenizer.apply_chat_template(
                text_messages(record.prompt), tokenize=False, add_generation_prompt=True
            )
        except Exception as error:  # noqa: BLE001 - a template error is a data error here
            raise InputError(f"{record.where}: cannot render messages ({clip(error)})") from None
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"{record.where}: the messages render to an empty prompt")
        prompt = chat_prompt(text, record.prompt)
    prompt.where, prompt.columns = record.where, record.columns
    return prompt


def _check_lengths(prompts: list[str], rows: list[list[int]], max_length: int, of: str = "prompts") -> None:
    too_long = [i for i, row in enumerate(rows) if len(row) > max_length]
    if too_long:
        first, more = too_long[0], f" ({len(too_long) - 1} more after it)" if len(too_long) > 1 else ""
        raise InputError(
            f"{prompt_location(prompts[first], first, of)}: the prompt is {len(rows[first])} tokens, "
            f"max_prompt_length is {max_length} (truncate_long_prompts: false){more}; raise max_prompt_length, "
            "shorten the prompt or set truncate_long_prompts: true"
        )


def _adds_special_tokens(tokenizer, text: str) -> bool:
    """The tokenizer's special tokens (BOS) go in front unless the text already starts with BOS: a rendered chat
    template (Llama 3 style) carries its own, and a second one is out of distribution."""
    bos = getattr(tokenizer, "bos_token", None)
    return not (bos and text.startswith(bos))


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of `text`, BOS in front once (`_adds_special_tokens`)."""
    return tokenizer(text, add_special_tokens=_adds_special_tokens(tokenizer, text))["input_ids"]


def encode_all(tokenizer, texts: list[str]) -> list[list[int]]:
    """`encode` of every text, in two batched calls (with and without special tokens) rather than one per text."""
    rows: list = [None] * len(texts)
    for special in (True, False):
        chosen = [i for i, text in enumerate(texts) if _adds_special_tokens(tokenizer, text) == special]
        if chosen:
            encoded = tokenizer([str(texts[i]) for i in chosen], add_special_tokens=special)["input_ids"]
            for i, ids in zip(chosen, encoded, strict=True):
                rows[i] = ids
    return rows


def tokenize_prompts(prompts: list[str], tokenizer, max_length: int, truncate: bool = True, warn: bool = True):
    """Left-padded (input_ids, attention_mask), both (B, P): generation appends to the right of every row. Prompts
    over `max_length` keep their last tokens, with a warning unless `warn` is False (a caller cutting them on
    purpose, not the user's setting), or raise when `truncate` is False."""
    rows = encode_all(tokenizer, prompts)
    too_long = [i for i, r in enumerate(rows) if len(r) > max_length]
    if too_long:
        if not truncate:
            _check_lengths(prompts, rows, max_length, of="batch")
        if warn:
            warnings.warn(
                f"{len(too_long)} prompt(s) longer than max_prompt_length={max_length}: kept the last tokens",
                stacklevel=2,
            )
        rows = [_keep_last(r, max_length, tokenizer.bos_token_id) for r in rows]
    if any(len(r) == 0 for r in rows):
        raise InputError("a prompt tokenizes to zero tokens")
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r) :] = torch.tensor(r)
        attention_mask[i, width - len(r) :] = 1
    return input_ids, attention_mask


def _keep_last(row: list[int], length: int, bos_id) -> list[int]:
    """The last `length` tokens of `row`, its BOS kept in front (models are trained to always see it)."""
    if bos_id is not None and length > 1 and row[0] == bos_id:
        return [bos_id] + row[len(row) - length + 1 :]
    return row[-length:]


def check_prompt_token_ids(prompts: list[str], tokenizer, vocab_size: int, end_ids=()) -> None:
    """Every id the model will embed is one of its `vocab_size` rows: a token added to the tokenizer without
    resizing the model's embeddings otherwise stops a step with torch's bare "index out of range in self" (or a
    CUDA device-side assert). Checks the pad id (padding embeds it) and, only when the tokenizer has ids beyond
    `vocab_size` (so most runs skip the pass), every prompt's. `end_ids` the model cannot sample get a warning."""
    vocab_size = int(vocab_size)
    hint = (
        f"the tokenizer has {len(tokenizer)} tokens: resize the model's embeddings to it "
        "(model.resize_token_embeddings(len(tokenizer)), then save) or use the tokenizer the model was trained with"
    )
    pad = tokenizer.pad_token_id
    if pad is not None and not 0 <= pad < vocab_size:
        raise InputError(
            f"the tokenizer's pad token {tokenizer.pad_token!r} is id {pad}, beyond the model's "
            f"vocab_size {vocab_size} (its input embeddings); {hint}"
        )
    unreachable = sorted({int(i) for i in end_ids if not 0 <= int(i) < vocab_size})
    if unreachable:
        warnings.warn(
            f"end-of-response token id(s) {unreachable} are beyond the model's vocab_size {vocab_size}: "
            "it can never sample them, so no response ends there",
            stacklevel=2,
        )
    if max(tokenizer.get_vocab().values(), default=-1) < vocab_size:
        return  # no prompt can hold an id the model lacks
    for i, row in enumerate(encode_all(tokenizer, prompts)):
        beyond = [token for token in row if not 0 <= token < vocab_size]
        if beyond:
            token = tokenizer.convert_ids_to_tokens(beyond[0])
            raise InputError(
                f"{prompt_location(prompts[i], i)}: token {token!r} is id {beyond[0]}, beyond the model's "
                f"vocab_size {vocab_size} (its input embeddings); {hint}"
            )


class PromptSampler:
    """Draws batches without replacement in a seeded random order, epoch after epoch; its state resumes a run."""

    def __init__(self, n_prompts: int, seed: int):
        self.n_prompts, self.seed = n_prompts, seed
        self.epoch, self.position = 0, 0

    def _order(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.n_prompts, generator=g).tolist()

    def next_indices(self, batch_size: int) -> list[int]:
        indices = []
        while len(indices) < batch_size:
            order = self._order()
            take = order[self.position : self.position + batch_size - len(indices)]
            indices += take
            self.position += len(take)
            if self.position >= self.n_prompts:
                self.epoch, self.position = self.epoch + 1, 0
        return indices

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "n_prompts": self.n_prompts, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["n_prompts"] != self.n_prompts:
            raise InputError(f"resume: the run had {state['n_prompts']} prompts, this one has {self.n_prompts}")
        self.epoch, self.position = state["epoch"], state["position"]
