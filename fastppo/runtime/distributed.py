"""Training on several processes: torchrun, DDP or FSDP2, and the global statistics of a PPO iteration.

`torchrun --nproc_per_node N -m fastppo train --config run.yaml` (or `fastppo train --nproc N ...`, whose launcher,
launcher.py, gives its processes the same environment and ends the run as one process would) starts N processes;
each joins the process group from that environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), dies with its
launcher (`launcher.die_with_parent`), takes its share of every rollout batch,
generates and scores it locally, and the ranks meet only where the math needs the whole batch:

    reward normalization      running moments of every rank's scores (all-gather)
    advantage whitening       global count, mean and variance (all-reduce), = masked_whiten on the whole batch
    loss aggregation          the minibatch's token (or sequence) count over all ranks is every loss's denominator
    gradients                 DDP all-reduce or FSDP2 reduce-scatter, both averaging: the loss is scaled by N so
                              that N ranks x b sequences take the same step as 1 process x N*b sequences
    gradient clipping         the global norm (FSDP2: a DTensor norm over the shards)
    KL controller, metrics    computed on the gathered per-sequence/per-token tensors: the same on every rank

The policy/value model is replicated (`parallel: ddp`) or sharded per transformer block and at the root
(`parallel: fsdp`, FSDP2's `fully_shard`). The frozen reference is sharded too under FSDP when it is a plain
(unquantized) model, and replicated otherwise; the reward model is replicated (quantize it to fit).

In a single process (no torchrun environment) every helper here is the identity and nothing is wrapped.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import itertools
import os
import types
import warnings

import torch
import torch.distributed as dist
from torch import nn

from fastppo import ops
from fastppo.runtime import launcher
from fastppo.runtime.metrics import Stats

# --- who am I ---------------------------------------------------------------------------------------------------


def world_size() -> int:
    """Processes in the run: the process group's size, else torchrun's WORLD_SIZE, else 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """Rank 0: the one process that writes metrics, TensorBoard logs and checkpoints."""
    return rank() == 0


def init(device: torch.device) -> torch.device:
    """Join torchrun's process group (gloo on CPU, NCCL on CUDA) and return this rank's device (cuda:LOCAL_RANK).

    A no-op returning `device` in a single process. Safe to call again (a second trainer in the same process)."""
    if world_size() <= 1:
        return device
    launcher.die_with_parent()  # a worker outliving torchrun (SIGKILL) would go on writing into output_dir
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        # Torn down before the interpreter exits: left to the C++ destructors, a rank could end in "terminate called
        # without an active exception" (SIGABRT) after a complete run.
        atexit.register(dist.destroy_process_group)
    return device


def share(items: list) -> list:
    """This rank's contiguous block of `items` (config validation makes the length divisible by the world size):
    the global batch is the ranks' blocks in rank order, the same rows a single process would take."""
    n, r = world_size(), rank()
    size = len(items) // n
    return items[r * size : (r + 1) * size]


# --- collectives (identity in one process) ----------------------------------------------------------------------


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum of `x` over ranks (a new tensor on x's device); `x` itself in one process."""
    if world_size() == 1:
        return x
    out = x.detach().to(_comm_device(), copy=True)
    dist.all_reduce(out)
    return out.to(x.device)


def reduce_stats(stats: Stats) -> Stats:
    """Every rank's `stats` combined as each kind says: sums and weighted means add up (each rank holds its share),
    maxima take the largest. Every rank holds the same names. `stats` itself in one process."""
    if world_size() == 1:
        return stats
    names = sorted(stats.totals)
    summed = [n for n in names if stats.kinds[n] != Stats.MAX]
    largest = [n for n in names if stats.kinds[n] == Stats.MAX]
    out = Stats()
    if summed:
        totals = all_reduce_sum(torch.tensor([stats.totals[n] for n in summed], dtype=torch.float64)).tolist()
        for name, value in zip(summed, totals, strict=True):
            out.add(name, value, stats.kinds[name])
    if largest:
        maxima = _all_reduce_max(torch.tensor([stats.totals[n] for n in largest], dtype=torch.float64)).tolist()
        for name, value in zip(largest, maxima, strict=True):
            out.add(name, value, Stats.MAX)
    return out


def all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """(N * B, ...) every rank's (B, ...) rows in rank order; a 2-d `x` is right-padded with zeros to the widest
    rank's width first (response lengths differ per rank). `x` itself in one process."""
    if world_size() == 1:
        return x
    dtype, x = x.dtype, x.detach().to(_comm_device())
    if x.dtype == torch.bool:  # not every backend reduces or gathers bool
        x = x.to(torch.uint8)
    if x.dim() == 2:
        width = int(_all_reduce_max(torch.tensor(x.shape[1])))
        x = torch.nn.functional.pad(x, (0, width - x.shape[1]))
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts).to(dtype)


def _all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    out = x.to(_comm_device(), copy=True)
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out


def global_counts(mask: torch.Tensor) -> tuple[float, float]:
    """(valid tokens, non-empty sequences) of a (B, T) response mask, summed over ranks: the loss denominators."""
    counts = all_reduce_sum(torch.stack([mask.sum(), (mask.sum(-1) > 0).sum()]).double())
    return float(counts[0]), float(counts[1])


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """`ops.masked_whiten` over the global batch (every rank's valid positions): the same mean and unbiased variance
    as one process whitening the concatenated batch, from an all-reduced (count, sum) and then sum of squared
    deviations (two passes, as the reference: no sum-of-squares cancellation). Float64 accumulation."""
    if world_size() == 1:
        return ops.masked_whiten(x, mask, shift_mean, eps)
    out_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    valid = mask.bool()
    zero = torch.zeros((), dtype=torch.float64, device=x.device)
    x64 = torch.where(valid, x.double(), zero)
    count, total = all_reduce_sum(torch.stack([valid.sum().double(), x64.sum()]))
    mean = total / count.clamp(min=1)
    centered = torch.where(valid, x64 - mean, zero)
    var = all_reduce_sum((centered * centered).sum()) / (count - 1).clamp(min=1)
    whitened = centered * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(valid, whitened, zero).to(out_dtype)


def gather_fields(batch, names: tuple[str, ...]):
    """The named per-sequence and per-token tensors of `batch`, gathered from every rank (padding has mask 0 and
    value 0, so sums and masked statistics are unchanged); a field that is None stays None. `batch` itself in one
    process."""
    if world_size() == 1:
        return batch
    fields = {name: getattr(batch, name) for name in names}
    return types.SimpleNamespace(**{name: None if x is None else all_gather_rows(x) for name, x in fields.items()})


def max_over_ranks(value: int) -> int:
    """The largest of every rank's `value` (the same on every rank); `value` in one process."""
    if world_size() == 1:
        return value
    return int(_all_reduce_max(torch.tensor(int(value))))


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any: a decision all ranks take together (stop the loop) must not
    hang the others in their next collective. `flag` in one process."""
    return bool(max_over_ranks(int(flag)))


def all_gather_objects(obj) -> list:
    """Every rank's `obj` (pickled), in rank order; [obj] in one process."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj):
    """Rank 0's `obj` on every rank (also a barrier); `obj` in one process."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class NullLogger:
    """The metrics logger of ranks other than 0: they compute the same metrics, rank 0 writes them."""

    def log(self, metrics: dict) -> None:
        pass

    def log_completions(self, rows: list[dict], step: int, split: str) -> None:
        pass

    def truncate_after(self, step: int) -> None:
        pass

    def close(self) -> None:
        pass


# --- the wrapped model --------------------------------------------------------------------------------------------


class Parallel:
    """How the policy/value model runs: unwrapped (one process), DDP or FSDP2. Every method is a no-op (or the
    identity) in one process, so the trainer calls them unconditionally.

    `train_model` is what the PPO update calls forward on (DDP's wrapper, whose forward arms its gradient
    all-reduce); the trainer's `model` stays the PolicyValueModel (under FSDP2 the same object, sharded in place).
    """

    def __init__(self, mode: str):
        self.mode = mode if world_size() > 1 else "none"
        self.train_model = None
        self._skeleton = None  # FSDP, rank 0: a weightless copy of the model to save checkpoints in the HF layout
        self._tied: list[list[str]] = []  # names of parameters shared by several modules (tied embeddings)

    def wrap(self, model: nn.Module, reference: nn.Module | None, device: torch.device):
        """(model, reference): wrapped for this mode; call before building the optimizer (FSDP2 swaps the
        parameters for sharded DTensors)."""
        self.train_model = model
        if self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            # DDP broadcasts rank 0's weights at construction, and all-reduces gradients in the backward.
            device_ids = [device.index] if device.type == "cuda" else None
            self.train_model = DistributedDataParallel(model, device_ids=device_ids)
        elif self.mode == "fsdp":
            _broadcast_from_rank0(model)  # each rank keeps its slice of its own copy: they must be equal first
            if is_main():
                self._skeleton = _meta_copy(model)
                self._tied = _tied_names(model)
            _fully_shard(model)
            # FSDP2 warns that in-place ops on its outputs' views would skip its pre-backward hook; the PPO losses
            # only read the model's outputs (torch.where, products), never modify them.
            warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
            if reference is not None and all(p.is_floating_point() for p in reference.parameters()):
                _broadcast_from_rank0(reference)
                _fully_shard(reference)  # quantized references stay replicated: FSDP shards floating tensors
        return model, reference

    # -- training ------------------------------------------------------------------------------------------------

    def backward(self, loss: torch.Tensor) -> None:
        """`loss` is this rank's part of the global loss (global denominator), so the global gradient is the SUM of
        the ranks' gradients; DDP and FSDP2 average them, hence the factor N."""
        if self.mode == "none":
            loss.backward()
        else:
            (loss * world_size()).backward()

    def no_sync(self, last: bool):
        """DDP: accumulate micro-batch gradients locally and all-reduce once, on the minibatch's last backward.
        (FSDP2 reduce-scatters every backward: keeping unsharded gradients would cost the memory it saves.)"""
        if self.mode == "ddp" and not last:
            return self.train_model.no_sync()
        return contextlib.nullcontext()

    @staticmethod
    def full_tensor(x):
        """A plain tensor from FSDP2's DTensor results (the clipped gradient norm); `x` otherwise."""
        return x.full_tensor() if hasattr(x, "full_tensor") else x

    # -- calling the model outside its own forward -------------------------------------------------------------

    def full_params(self, module: nn.Module | None):
        """FSDP: every parameter of `module` unsharded for the duration (generation). A decode loop stops when this
        rank's rows have stopped, so ranks run different numbers of forwards: they must not all-gather in it."""
        if self.mode != "fsdp" or not _is_fsdp(module):
            return contextlib.nullcontext()
        return _unsharded(module, everything=True)

    def root_params(self, module: nn.Module | None):
        """FSDP: the root's own parameters (embeddings, LM head, value head, final norm) unsharded, for forwards that
        call the LM directly rather than through the root's forward (the reference, adapters disabled); the
        transformer blocks still all-gather in their own forwards (the same count on every rank)."""
        if self.mode != "fsdp" or not _is_fsdp(module):
            return contextlib.nullcontext()
        return _unsharded(module, everything=False)

    # -- checkpoints -----------------------------------------------------------------------------------------------

    def full_state_dict(self, model: nn.Module) -> dict:
        """The full (unsharded) state dict, on CPU, on rank 0 (empty elsewhere under FSDP). Collective under FSDP."""
        if self.mode != "fsdp":
            return model.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    @contextlib.contextmanager
    def model_for_saving(self, model: nn.Module):
        """Yields, on rank 0, a plain model holding the full weights (`model` itself unless sharded: then the
        weightless skeleton filled with the gathered weights, freed afterwards), and None on the other ranks, which
        take part in the gathering. Checkpoints thus stay in the Hugging Face layout, loadable at any world size."""
        if self.mode != "fsdp":
            yield model if is_main() else None
            return
        state = self.full_state_dict(model)  # every rank takes part
        if not is_main():
            yield None
            return
        replica = copy.deepcopy(self._skeleton)
        replica.load_state_dict(state, assign=True)  # the gathered CPU tensors become its parameters, no copy
        for names in self._tied:  # assigning gave each name its own tensor: share them again, as saved models expect
            for name in names[1:]:
                module, _, attr = name.rpartition(".")
                setattr(replica.get_submodule(module), attr, replica.get_parameter(names[0]))
        yield replica

    def optimizer_state_dict(self, model: nn.Module, optimizer) -> dict:
        """One process: `optimizer.state_dict()` as always. Several: the full state keyed by parameter names
        (collective; the content on rank 0), which any world size can load."""
        if self.mode == "none":
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(model, optimizer, options=options)

    def load_optimizer_state_dict(self, model: nn.Module, optimizer, state: dict) -> None:
        """Load either form of `optimizer_state_dict` (saved by one process: integer keys; by several: names)."""
        by_name = any(isinstance(k, str) for k in state["state"]) or any(
            isinstance(p, str) for group in state["param_groups"] for p in group["params"]
        )
        if not by_name and self.mode != "fsdp":
            optimizer.load_state_dict(state)  # the same parameters, in the same order
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        if not by_name:
            state = _keyed_by_name(model, state)
        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def _is_fsdp(module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks: modules of the classes the model declares unsplittable (`_no_split_modules`, e.g.
    LlamaDecoderLayer), for every transformers model inside `model` (the LM, a separate critic's copy)."""
    names = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def _fully_shard(model: nn.Module) -> None:
    """FSDP2: one all-gather unit per transformer block, then the root (embeddings, heads, norms, value head)."""
    from torch.distributed.fsdp import fully_shard

    for block in _blocks(model):
        fully_shard(block)
    fully_shard(model)


def _broadcast_from_rank0(module: nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank, in place (what DDP does at construction)."""
    for t in itertools.chain(module.parameters(), module.buffers()):
        buffer = t.detach().to(_comm_device())
        dist.broadcast(buffer, src=0)
        t.data.copy_(buffer)


def _meta_copy(module: nn.Module) -> nn.Module:
    """A deep copy of `module` whose parameters and buffers are on the meta device: its structure (config, LoRA
    wrappers, tied weights) at no memory. Seeding deepcopy's memo with meta tensors is what skips copying them."""
    memo = {}
    for t in itertools.chain(module.parameters(), module.buffers()):
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(module, memo)


def _tied_names(model: nn.Module) -> list[list[str]]:
    """Groups of names under which one parameter appears (GPT-2's input embedding and LM head)."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return [group for group in names.values() if len(group) > 1]


@contextlib.contextmanager
def _unsharded(root: nn.Module, everything: bool):
    from torch.distributed.fsdp import FSDPModule

    # FSDP2 decides which module is the root on the first forward; a forward that starts inside the model (a block
    # called by the LM directly) would otherwise claim that role. Settle it first.
    root._get_fsdp_state()._lazy_init()
    modules = [m for m in root.modules() if isinstance(m, FSDPModule)] if everything else [root]
    if everything:
        root.set_reshard_after_forward(False)  # keep the blocks gathered across the decode loop's forwards
    for module in modules:
        module.unshard()
    try:
        yield root
    finally:
        for module in modules:
            module.reshard()
        if everything:
            root.set_reshard_after_forward(True)  # the blocks' default...
            root.set_reshard_after_forward(False, recurse=False)  # ...and the root's: kept for the backward


def _keyed_by_name(model: nn.Module, state: dict) -> dict:
    """A one-process `optimizer.state_dict()` (parameters numbered in `model.parameters()` order, trainable ones
    only) keyed by parameter names instead, the form `set_optimizer_state_dict` loads into a sharded model."""
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    return {
        "state": {names[i]: value for i, value in state["state"].items()},
        "param_groups": [{**group, "params": [names[i] for i in group["params"]]} for group in state["param_groups"]],
    }
