"""Cutting rows of different lengths into micro-batches that pay for little padding.

Rows sorted by length are cut into consecutive micro-batches; a micro-batch computes rows x its longest row's tokens
(its rows are padded to it). `cut_sorted` picks the cut points: on a CPU the cut that computes the fewest tokens
plus each forward's fixed cost (`forward_overhead`), within a row cap and an optional token budget; elsewhere
micro-batches filled in order. PPO's micro-batches (`ppo.batch`), the reward models' forwards and the supervised
stages use it.
"""

from __future__ import annotations

# A forward's (and backward's) fixed cost on a CPU (per-op and per-layer overheads), in tokens' worth of its
# per-token cost: the planner splits a micro-batch only where that saves more padded tokens than this. The per-token
# cost shrinks with the model and the fixed cost much less, so small models pay more tokens' worth per forward:
# `python -m bench.forward_cost` (the intercept over the slope of time against tokens) measures tens of tokens at
# 25M-135M parameters and hundreds at 56k; hence this many at REFERENCE_PARAMETERS and above, scaled up below.
FORWARD_OVERHEAD_TOKENS = 64
REFERENCE_PARAMETERS = 25_000_000


def forward_overhead(model) -> int | None:
    """The planner's per-forward cost in tokens for `model`: None (fill micro-batches in order) off a CPU, where
    it has not been measured."""
    parameters = list(model.parameters())
    if not parameters or parameters[0].device.type != "cpu":
        return None
    count = sum(p.numel() for p in parameters)
    return round(FORWARD_OVERHEAD_TOKENS * max(1.0, REFERENCE_PARAMETERS / max(count, 1)))


def sorted_micro_batches(
    lengths: list[int], size: int | None, tokens: int | None, overhead: int | None
) -> list[list[int]]:
    """Indices of sequences of `lengths` tokens, sorted by length and cut by `cut_sorted` (`size` rows at most,
    None: no cap; `overhead`: `forward_overhead` of the model)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    chunks = cut_sorted([(lengths[i], 0) for i in order], size or len(lengths), tokens, overhead)
    return [[order[i] for i in chunk] for chunk in chunks]


def cut_sorted(
    lengths: list[tuple[int, int]], size: int, tokens: int | None = None, overhead: int | None = None
) -> list[list[int]]:
    """Positions 0..n-1 of rows sorted by length, cut into consecutive chunks of at most `size` rows, a chunk
    computing rows x (its largest first length + largest second length) tokens, at most `tokens` of them unless it
    is one row. With `overhead`, the cut that computes the fewest tokens plus `overhead` per chunk (dynamic
    programming over the cut points); without, chunks filled in order."""
    n = len(lengths)
    if overhead is None:
        chunks: list[list[int]] = []
        first = second = 0
        for i, (a, b) in enumerate(lengths):
            first, second = max(first, a), max(second, b)
            full = not chunks or len(chunks[-1]) == size
            if full or (tokens is not None and (len(chunks[-1]) + 1) * (first + second) > tokens):
                chunks.append([i])
                first, second = a, b
            else:
                chunks[-1].append(i)
        return chunks
    best, start = [0] + [None] * n, [0] * (n + 1)  # best[i]: the cheapest cut of the first i rows; start: its last
    for i in range(1, n + 1):
        first = second = 0
        for j in range(i - 1, max(i - size, 0) - 1, -1):  # the last chunk is rows j..i-1
            first, second = max(first, lengths[j][0]), max(second, lengths[j][1])
            computed = (i - j) * (first + second)
            if tokens is not None and computed > tokens and i - j > 1:
                break  # a chunk reaching further back computes more still
            if best[i] is None or best[j] + overhead + computed < best[i]:
                best[i], start[i] = best[j] + overhead + computed, j
    chunks, i = [], n
    while i > 0:
        chunks.append(list(range(start[i], i)))
        i = start[i]
    return chunks[::-1]
