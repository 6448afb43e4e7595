"""Prompts: reading them (JSONL or a list), tokenizing them left-padded, and a seeded, resumable sampler."""

from __future__ import annotations

import json
import warnings

import torch

from fastppo.errors import InputError


class ChatPrompt(str):
    """A prompt rendered from chat messages with the policy's template; `.messages` keeps them, so that a reward
    model with a template of its own can render the conversation its way."""

    messages: list


def chat_prompt(text: str, messages: list) -> ChatPrompt:
    prompt = ChatPrompt(text)
    prompt.messages = messages
    return prompt


def read_prompts(source, tokenizer=None) -> list[str]:
    """A list of prompt strings from a list, or from a JSONL file of {"prompt": str} or {"messages": [...]} lines
    (chat messages are rendered with the tokenizer's chat template, ending with the assistant's turn)."""
    if isinstance(source, (list, tuple)):
        prompts = list(source)
        bad = next((i for i, p in enumerate(prompts) if not isinstance(p, str)), None)
        if bad is not None:
            raise InputError(f"prompts[{bad}] is {type(prompts[bad]).__name__}, expected a string")
        origin = "the prompt list"
    else:
        prompts, origin = _read_jsonl(source, tokenizer), str(source)
    if not prompts:
        raise InputError(f"no prompts in {origin}")
    return prompts


def _read_jsonl(path: str, tokenizer) -> list[str]:
    prompts = []
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"cannot read prompts file {path}: {error}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise InputError(f"{path}:{number}: not valid JSON ({error.msg})") from None
        if isinstance(record, dict) and isinstance(record.get("prompt"), str):
            prompts.append(record["prompt"])
        elif isinstance(record, dict) and isinstance(record.get("messages"), list):
            if tokenizer is None or not getattr(tokenizer, "chat_template", None):
                raise InputError(f"{path}:{number}: chat messages need a tokenizer with a chat template")
            try:
                text = tokenizer.apply_chat_template(record["messages"], tokenize=False, add_generation_prompt=True)
            except Exception as error:  # noqa: BLE001 - a template error is a data error here
                raise InputError(f"{path}:{number}: cannot render messages ({error})") from None
            prompts.append(chat_prompt(text, record["messages"]))
        else:
            raise InputError(f'{path}:{number}: expected {{"prompt": "..."}} or {{"messages": [...]}}')
    return prompts


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of `text` with the tokenizer's special tokens (BOS), unless the text already starts with BOS: a
    rendered chat template (Llama 3 style) carries its own, and a second one is out of distribution."""
    bos = getattr(tokenizer, "bos_token", None)
    return tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"]


def tokenize_prompts(prompts: list[str], tokenizer, max_length: int, truncate: bool = True):
    """Left-padded (input_ids, attention_mask), both (B, P): generation appends to the right of every row."""
    rows = [encode(tokenizer, p) for p in prompts]
    too_long = [i for i, r in enumerate(rows) if len(r) > max_length]
    if too_long:
        if not truncate:
            raise InputError(
                f"{len(too_long)} prompt(s) exceed max_prompt_length={max_length} (first: #{too_long[0]}); "
                "raise max_prompt_length or set truncate_long_prompts: true"
            )
        warnings.warn(
            f"{len(too_long)} prompt(s) longer than max_prompt_length={max_length}: kept the last tokens", stacklevel=2
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
