"""Prompts: reading them (JSONL or a list), tokenizing them left-padded, and a seeded, resumable sampler."""

from __future__ import annotations

import warnings

import torch

from fastppo.runtime.errors import InputError
from fastppo.runtime.validation import clip, read_jsonl, require_text, short


class Prompt(str):
    """A prompt read from a file; `.where` is its file:line, for errors found after loading (its length, its ids)."""

    where: str


class ChatPrompt(Prompt):
    """A prompt rendered from chat messages with the policy's template; `.messages` keeps them, so that a reward
    model with a template of its own can render the conversation its way."""

    messages: list


def chat_prompt(text: str, messages: list) -> ChatPrompt:
    prompt = ChatPrompt(text)
    prompt.messages = messages
    return prompt


def prompt_location(prompt: str, index: int, of: str = "prompts") -> str:
    """How an error names a prompt: its file:line when read from a file, else its index in `of`."""
    return getattr(prompt, "where", None) or (f"prompts[{index}]" if of == "prompts" else f"{of} prompt #{index}")


def read_prompts(source, tokenizer=None, max_length: int | None = None, truncate: bool = True) -> list[str]:
    """A list of prompt strings from a list, or from a JSONL file of {"prompt": str} or {"messages": [...]} lines
    (chat messages are rendered with the tokenizer's chat template, ending with the assistant's turn). Every prompt
    is checked here, at load, not when a step draws it: a bad one is named by its index or file:line. With
    `truncate` False, that includes its length in tokens against `max_length` (truncate_long_prompts: false)."""
    if source is None:
        raise InputError('prompts: none given (a JSONL file of {"prompt": ...} lines, or a list of strings)')
    if isinstance(source, (list, tuple)):
        for i, prompt in enumerate(source):
            if not isinstance(prompt, str) or not prompt.strip():
                raise InputError(f"prompts[{i}] must be a non-empty string, got {short(prompt)}")
        if not source:
            raise InputError("no prompts in the prompt list")
        prompts = list(source)
    else:
        prompts = [_render(source, number, prompt, tokenizer) for number, prompt in read_prompt_records(source)]
    if not truncate and max_length is not None:
        if tokenizer is None:
            raise ValueError("read_prompts: checking prompt lengths needs the tokenizer")
        _check_lengths(prompts, encode_all(tokenizer, prompts), max_length)
    return prompts


def _check_lengths(prompts: list[str], rows: list[list[int]], max_length: int, of: str = "prompts") -> None:
    too_long = [i for i, row in enumerate(rows) if len(row) > max_length]
    if too_long:
        first, more = too_long[0], f" ({len(too_long) - 1} more after it)" if len(too_long) > 1 else ""
        raise InputError(
            f"{prompt_location(prompts[first], first, of)}: the prompt is {len(rows[first])} tokens, "
            f"max_prompt_length is {max_length} (truncate_long_prompts: false){more}; raise max_prompt_length, "
            "shorten the prompt or set truncate_long_prompts: true"
        )


def read_prompt_records(path: str) -> list[tuple[int, str | list]]:
    """(line number, prompt string or chat messages) of every record of a prompts JSONL file, each checked; no
    tokenizer needed, so a file is checked before anything loads."""
    records = []
    for number, record in read_jsonl(path, "prompts"):
        where = f"{path}:{number}"
        if "prompt" in record:
            records.append((number, require_text(where, "prompt", record["prompt"])))
        elif "messages" in record:
            records.append((number, _check_messages(where, record["messages"])))
        else:
            raise InputError(f'{where}: expected {{"prompt": "..."}} or {{"messages": [...]}}')
    if not records:
        raise InputError(f"no prompts in {path}")
    return records


def _check_messages(where: str, messages) -> list:
    if not isinstance(messages, list) or not messages:
        raise InputError(f'{where}: "messages" must be a non-empty list of {{"role", "content"}} objects')
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or not message["role"]:
            raise InputError(f'{where}: messages[{i}] must be an object with a "role" string, got {short(message)}')
        if not isinstance(message.get("content"), (str, list)):
            raise InputError(f'{where}: messages[{i}] needs a "content" string, got {short(message.get("content"))}')
    return messages


def _render(path: str, number: int, prompt: str | list, tokenizer) -> str:
    if isinstance(prompt, str):
        prompt = Prompt(prompt)
        prompt.where = f"{path}:{number}"
        return prompt
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise InputError(f"{path}:{number}: chat messages need a tokenizer with a chat template")
    try:
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    except Exception as error:  # noqa: BLE001 - a template error is a data error here
        raise InputError(f"{path}:{number}: cannot render messages ({clip(error)})") from None
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"{path}:{number}: the messages render to an empty prompt")
    rendered = chat_prompt(text, prompt)
    rendered.where = f"{path}:{number}"
    return rendered


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
