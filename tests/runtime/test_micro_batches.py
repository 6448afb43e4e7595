"""The micro-batch planner: the cheapest cut of length-sorted rows, within the row cap and the token budget."""

import pytest
import torch

from fastppo.runtime.micro_batches import FORWARD_OVERHEAD_TOKENS, cut_sorted, forward_overhead, sorted_micro_batches


def all_cuts(n: int):
    """Every way to cut positions 0..n-1 into consecutive chunks."""
    if n == 0:
        yield []
        return
    for last in range(1, n + 1):
        for cut in all_cuts(n - last):
            yield cut + [list(range(n - last, n))]


@pytest.mark.parametrize("seed", range(20))
def test_the_planned_cut_is_the_cheapest_one(seed):
    """Against every cut of up to 8 rows: the fewest computed tokens plus the per-forward overhead, within the row
    cap and the token budget."""
    g = torch.Generator().manual_seed(seed)
    n, size, overhead = int(torch.randint(1, 9, (1,), generator=g)), int(torch.randint(1, 5, (1,), generator=g)), 16
    responses = sorted(torch.randint(1, 60, (n,), generator=g).tolist())
    lengths = [(int(torch.randint(2, 12, (1,), generator=g)), r) for r in responses]
    tokens = None if seed % 2 else 80

    def computed(chunk):
        return len(chunk) * (max(lengths[i][0] for i in chunk) + max(lengths[i][1] for i in chunk))

    def allowed(cut):
        return all(len(c) <= size and (tokens is None or len(c) == 1 or computed(c) <= tokens) for c in cut)

    def total(cut):
        return sum(overhead + computed(c) for c in cut)

    planned = cut_sorted(lengths, size, tokens, overhead)
    assert allowed(planned) and sum(planned, []) == list(range(n))
    assert total(planned) == min(total(cut) for cut in all_cuts(n) if allowed(cut))


def test_the_planned_cut_pays_for_few_padded_tokens():
    """Eight short answers and eight long ones of very different lengths (the varlen bench's shape): rows-only
    micro-batches of 8 compute far more than the real tokens, the planned cut little more."""
    lengths = [(32, r) for r in (3, 10, 10, 23, 28, 32, 35, 36, 40, 58, 60, 72, 76, 80, 204, 233)]
    real = sum(a + b for a, b in lengths)

    def computed(cut):
        return sum(len(c) * (max(lengths[i][0] for i in c) + max(lengths[i][1] for i in c)) for c in cut)

    by_rows = cut_sorted(lengths, size=8)
    planned = cut_sorted(lengths, size=8, overhead=64)
    assert real / computed(by_rows) < 0.6 and real / computed(planned) > 0.85, (by_rows, planned)


def test_sorted_micro_batches_returns_every_index_once_grouped_by_length():
    lengths = [9, 3, 4, 5, 40, 2]
    chunks = sorted_micro_batches(lengths, size=3, tokens=None, overhead=64)
    assert sorted(sum(chunks, [])) == list(range(6))
    assert all(len(c) <= 3 for c in chunks)
    flat = [lengths[i] for c in chunks for i in c]
    assert flat == sorted(flat)  # consecutive runs of the sorted order
    assert sorted_micro_batches(lengths, size=None, tokens=None, overhead=None) == [[5, 1, 2, 3, 0, 4]]


def test_a_small_model_pays_more_tokens_per_forward():
    """The per-token cost shrinks with the model, the fixed cost much less: a tiny model's forward is worth more
    tokens, so its rows are split into fewer micro-batches."""
    assert forward_overhead(torch.nn.Linear(5000, 5000)) == FORWARD_OVERHEAD_TOKENS  # 25M parameters
    tiny = forward_overhead(torch.nn.Linear(100, 100))
    assert tiny > 100 * FORWARD_OVERHEAD_TOKENS
    lengths = [(4, 1)] * 6 + [(4, 200)]
    assert len(cut_sorted(lengths, size=8, overhead=FORWARD_OVERHEAD_TOKENS)) == 2  # the long answer alone
    assert len(cut_sorted(lengths, size=8, overhead=tiny)) == 1
