"""Cutting rows of different lengths into micro-batches that pay for little padding.

Rows sorted by length are cut into consecutive micro-batches; a micro-batch computes rows x its longest row's
tokens (its rows are padded to it). `cut_sorted` picks the cut points: on a CPU the cut that computes the fewest
tokens plus each forward's fixed cost, within a row cap and an optional token budget; elsewhere micro-batches
filled in order. PPO's micro-batches (`ppo.batch`), the reward models' forwards and the supervised stages use it.
"""

from __future__ import annotations

# A forward's (and backward's) fixed cost on a CPU (per-op and per-layer overheads), in tokens' worth of its
# per-token cost: the planner splits a micro-batch only where that saves more padded tokens than this.
# `python -m bench.forward_cost` measures it (the intercept over the slope of time against tokens).
FORWARD_OVERHEAD_TOKENS = 64


def sorted_micro_batches(lengths: list[int], size: int | None, tokens: int | None, on_cpu: bool) -> list[list[int]]:
    """Indices of sequences of `lengths` tokens, sorted by length and cut by `cut_sorted` (`size` rows at most,
    None: no cap)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    overhead = FORWARD_OVERHEAD_TOKENS if on_cpu else None
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
