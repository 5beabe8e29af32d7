"""Data-parallel runs: every rank holds the whole model and reaches the same plan at every step.

Launched by `torchrun` or `accelerate launch` (both set RANK, WORLD_SIZE, MASTER_ADDR, ...), the
process group is torch.distributed's (gloo on the CPU, nccl on CUDA). Why the gradients are not
reduced by a `DistributedDataParallel` wrapper: DDP fixes the set of parameters it reduces when it
is built, and a plan changes that set as often as every step. Rebuilding DDP per plan change costs a
broadcast of every parameter and new buckets each time; `find_unused_parameters=True` reduces the
zeros of every candidate the plan left out (the traffic a plan should save) and traverses the graph
each step. Instead the engine issues the collectives DDP's reducer would, over exactly the
parameters the plan gives a gradient (its updated and probed units), after the step's last
backward, in buckets of DDP's default size (`Replicas.reduce_gradients`). When something reads
parameter gradients during backward (gradient-norm signals, gradselect/adagradselect's streaming
ranking, which frees gradients as it goes), each gradient is reduced in its own
post-accumulate-grad hook instead, registered before any reader's, so every reader sees the
global gradient (`Replicas.hook`). See docs/distributed.md.

Each rank's loss is weighted by its share of the global batch and gradients are summed, so the
update is the one a single process makes on the global batch (equal up to float summation order).
What a method decides from is agreed before it decides: the plan (checked equal on every rank,
so ranks that would disagree stop with an error instead of hanging in a collective), signals
(additive ones summed over ranks, then rank 0's values broadcast so every rank reads the same
bits), the counted memory (the largest rank's), the loss (the global batch's) and any measured
time (rank 0's).
"""
from __future__ import annotations

import atexit
import json
import os
import zlib
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import DynatuneError

BUCKET_BYTES = 25 * 2 ** 20  # DDP's default bucket_cap_mb


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env(device_name: str = "auto") -> "Replicas | None":
    """Join the process group a launcher (torchrun, accelerate launch) describes in the environment;
    None for a single process. The backend follows the device: nccl for CUDA, gloo for the CPU."""
    if world_size_from_env() <= 1 and not (dist.is_available() and dist.is_initialized()):
        return None
    if not dist.is_available():
        raise DynatuneError("WORLD_SIZE > 1 but this torch build has no torch.distributed; run one process.")
    if not dist.is_initialized():
        cuda = device_name != "cpu" and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=30))
    destroy_at_exit()
    return current()


_destroy_registered = False


def destroy_at_exit() -> None:
    """Tear the process group down when the interpreter exits, while it is still whole. Left to the
    interpreter's finalization, gloo's worker threads can outlive it and the process aborts
    ("terminate called without an active exception") after the run has finished and saved."""
    global _destroy_registered
    if not _destroy_registered:
        _destroy_registered = True
        atexit.register(_destroy_if_initialized)


def _destroy_if_initialized() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


STRATEGIES = ("ddp", "fsdp")


def current(strategy: str = "ddp") -> "Replicas | None":
    """The data-parallel group of this process, or None when it runs alone. strategy: ddp (every
    rank holds the whole model; the engine reduces the plan's gradients) or fsdp (FSDP2's
    fully_shard on every block and the root; FSDP2 reduce-scatters the gradients)."""
    if strategy not in STRATEGIES:
        raise DynatuneError(f"strategy must be ddp or fsdp, got {strategy!r}.")
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return Replicas(strategy=strategy)
    return None


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A whole tensor: an FSDP2 shard (DTensor) is gathered, a collective every rank calls in the same
    order; any other tensor is returned as it is."""
    from torch.distributed.tensor import DTensor
    return t.full_tensor() if isinstance(t, DTensor) else t


def is_fully_sharded(model) -> bool:
    """Whether FSDP2's fully_shard has been applied to `model` (DynatuneTrainer shards before the
    Trainer builds its optimizer)."""
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def is_shard(t: torch.Tensor) -> bool:
    """Whether `t` is an FSDP2 DTensor (a rank's shard of a whole tensor)."""
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


def local_part(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 DTensor (no communication); any other tensor as it is."""
    from torch.distributed.tensor import DTensor
    return t.to_local() if isinstance(t, DTensor) else t


def shard_like(value: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """A whole tensor held as `p` is: this rank's shard when `p` is an FSDP2 DTensor (every rank holds
    the whole value, read from the same file, so nothing is communicated), else on p's device."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    if isinstance(p, DTensor) and not isinstance(value, DTensor):
        return distribute_tensor(value.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
    return value.to(p.device)


def digest(obj) -> int:
    """A 32-bit fingerprint of a JSON-able object (a plan, a list of names)."""
    return zlib.crc32(json.dumps(obj, sort_keys=True, default=str).encode())


class Replicas:
    """This rank's view of the data-parallel group: sharding, agreement and gradient reduction."""

    def __init__(self, group=None, bucket_bytes: int | None = None, strategy: str = "ddp"):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.is_main = self.rank == 0
        self.strategy = strategy
        self.bucket_bytes = int(bucket_bytes if bucket_bytes is not None else BUCKET_BYTES)
        self.flat_buckets: list[int] = []  # bytes of each flat copy the last reduce_gradients made
        # set by the loop before each backward: only the step's last one reduces (DDP's no_sync)
        self.final_backward = True
        self._reduced_in_hooks = False
        self.collectives = 0  # issued by this object (the benchmark counts them)

    # -- data ------------------------------------------------------------------------------------
    def shard(self, idx: list[int]) -> list[int]:
        """This rank's contiguous share of one global batch: the global order stays the plain loop's,
        and rank r's examples are the ones a single process with grad_accum x world_size would put
        in its r-th group of micro-batches."""
        n = len(idx)
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return idx[start:start + base + (1 if self.rank < extra else 0)]

    def check_batches(self, batch_size: int, grad_accum: int, n_examples: int) -> None:
        """Refuse, before training, a batch that cannot give every rank the same micro-batches."""
        if batch_size % (self.world * grad_accum):
            raise DynatuneError(f"batch_size={batch_size} must be a multiple of world_size x grad_accum = "
                                f"{self.world} x {grad_accum} under data parallelism (batch_size is the global batch).")
        last = n_examples % batch_size
        if last and last % (self.world * grad_accum):
            raise DynatuneError(f"the last batch of each epoch has {last} examples ({n_examples} % batch_size="
                                f"{batch_size}), which {self.world} ranks x grad_accum={grad_accum} cannot share "
                                "evenly; choose a batch_size or data.max_train so it divides evenly.")

    # -- agreement -------------------------------------------------------------------------------
    def _all_reduce(self, t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        self.collectives += 1
        dist.all_reduce(t, op=op, group=self.group)
        return t

    def _broadcast(self, t: torch.Tensor) -> torch.Tensor:
        self.collectives += 1
        dist.broadcast(t, src=dist.get_global_rank(self.group, 0) if self.group else 0, group=self.group)
        return t

    def _host(self, device=None) -> torch.device:
        """Where a collective's tensor must live: the CPU for gloo; for nccl the tensor's CUDA device
        (or, for the small vectors of agreement, this rank's current one)."""
        if dist.get_backend(self.group) == "gloo":
            return torch.device("cpu")
        if device is None or device.type != "cuda":
            return torch.device("cuda", torch.cuda.current_device())
        return device

    def check_same(self, value, what: str) -> None:
        """Stop every rank with one error when ranks hold different `value`s (its digest)."""
        d = float(digest(value))
        t = self._all_reduce(torch.tensor([d, -d], dtype=torch.float64, device=self._host()), dist.ReduceOp.MAX)
        if t[0].item() != -t[1].item():
            raise DynatuneError(f"ranks disagree on {what}; every rank must reach the same plan (rank {self.rank} "
                                f"has {str(value)[:200]}).")

    def sum_scalars(self, values: list[float]) -> list[float]:
        """The sums over ranks (float64), the same bits on every rank (rank 0's broadcast)."""
        t = self._all_reduce(torch.tensor(values, dtype=torch.float64, device=self._host()))
        return self._broadcast(t).tolist()

    def max_scalars(self, values: list[float]) -> list[float]:
        return self._all_reduce(torch.tensor(values, dtype=torch.float64, device=self._host()),
                                dist.ReduceOp.MAX).tolist()

    def from_main(self, values: list[float]) -> list[float]:
        """Rank 0's values on every rank (a measured time: each rank would read its own clock)."""
        return self._broadcast(torch.tensor(values, dtype=torch.float64, device=self._host())).tolist()

    def sum_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """A new tensor: `t` summed over ranks, rank 0's bits broadcast to all."""
        out = t.detach().to(self._host(t.device), torch.float64, copy=True)
        self._broadcast(self._all_reduce(out))
        return out.to(t.device, t.dtype)

    def broadcast_object(self, obj):
        """Rank 0's picklable object on every rank (an evaluation's metrics)."""
        box = [obj]
        self.collectives += 1
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def gather_objects(self, obj) -> list | None:
        """Every rank's object on rank 0 (a list by rank), None elsewhere."""
        out = [None] * self.world if self.is_main else None
        self.collectives += 1
        dist.gather_object(obj, out, dst=0, group=self.group)
        return out

    def barrier(self) -> None:
        dist.barrier(group=self.group)

    # -- parameters and gradients ----------------------------------------------------------------
    @torch.no_grad()
    def broadcast_params(self, tensors) -> None:
        """Rank 0's values in every rank's tensors (DDP does the same when it is built)."""
        for t in tensors:
            if self._host(t.device) != t.device:
                tmp = t.detach().cpu()
                self._broadcast(tmp)
                t.copy_(tmp)
            else:
                self._broadcast(t.data)

    @torch.no_grad()
    def reduce_gradients(self, named_params: list[tuple[str, torch.nn.Parameter]]) -> int:
        """Sum the gradients of `named_params` (in this order, the same on every rank) over ranks, in
        flat buckets of at most `bucket_bytes` per dtype; returns the bytes reduced. Parameters
        without a gradient are skipped, after checking every rank lacks the same ones."""
        have = [(n, p) for n, p in named_params if p.grad is not None]
        self.flat_buckets = []
        self.check_same([n for n, _ in have], "which parameters hold a gradient")
        total = 0
        bucket: list[torch.Tensor] = []
        size = 0
        for _, p in have + [(None, None)]:
            g = p.grad if p is not None else None
            if bucket and (g is None or g.dtype != bucket[0].dtype or g.device != bucket[0].device
                           or size + g.numel() * g.element_size() > self.bucket_bytes):
                total += self._reduce_bucket(bucket)
                bucket, size = [], 0
            if g is not None:
                bucket.append(g)
                size += g.numel() * g.element_size()
        return total

    def _reduce_bucket(self, grads: list[torch.Tensor]) -> int:
        if len(grads) == 1 and grads[0].is_contiguous() and self._host(grads[0].device) == grads[0].device:
            self._all_reduce(grads[0])
            return grads[0].numel() * grads[0].element_size()
        host = self._host(grads[0].device)
        flat = torch.cat([g.reshape(-1) for g in grads]).to(host)
        self.flat_buckets.append(flat.numel() * flat.element_size())
        self._all_reduce(flat)
        flat = flat.to(grads[0].device)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
        return flat.numel() * flat.element_size()

    def take_model(self, model, units, method) -> None:
        """Every rank starts from rank 0's weights (as DDP does when it is built) and, under fsdp, the
        model is sharded (fully_shard); a model already sharded (DynatuneTrainer shards it before the
        Trainer's optimizer exists) is left as it is."""
        if is_fully_sharded(model):
            return
        self.broadcast_params([*model.parameters(), *model.buffers()])
        if self.strategy == "fsdp":  # parameters become DTensor shards, under the same names
            self.fully_shard(model, units, method)

    def fully_shard(self, model, units, method) -> None:
        """FSDP2 on every block, then the root: a block's frozen and trainable parameters share one
        FSDP unit (FSDP2 reduce-scatters the gradients that exist and skips the others). Gradients
        are summed, not averaged (each rank's loss is already weighted by its share of the batch)."""
        from torch.distributed.fsdp import FSDPModule, fully_shard

        from .signals import SIGNALS
        if ((method.reads_gradients_in_backward and not method.reads_sharded_gradients_after_backward)
                or any(SIGNALS[s].reads_gradients_in_backward for s in method.signals)):
            raise DynatuneError(f"strategy=fsdp does not support {method.name} yet: it reads parameter gradients "
                                "during backward, which FSDP2 hands over sharded after its reduce-scatter (use strategy=ddp).")
        mesh = None  # the default group's mesh
        if self.group is not None:
            from torch.distributed.device_mesh import DeviceMesh
            mesh = DeviceMesh.from_group(self.group, "cpu" if dist.get_backend(self.group) == "gloo" else "cuda")
        for blk in model.get_submodule(units.blocks_path):
            fully_shard(blk, mesh=mesh)
        fully_shard(model, mesh=mesh)
        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.set_gradient_divide_factor(1.0)
                m.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM)

    def reshard(self, model) -> None:
        """FSDP2: reshard every unit. FSDP2 copies requires_grad from a sharded parameter to its
        unsharded one only when it gathers it, and a unit left gathered by a no-grad forward (an
        evaluation: the root is not resharded after forward) would train with the last plan's
        flags; resharded, the next forward gathers it again with this plan's. No-op when sharded."""
        if self.strategy != "fsdp":
            return
        from torch.distributed.fsdp import FSDPModule
        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.reshard()

    def reduce_in_hooks(self, params) -> list:
        """Reduce each parameter's gradient in its own post-accumulate-grad hook, on the step's last
        backward; registered before any reader's hook, so readers see the global gradient. Returns
        the handles."""
        self._reduced_in_hooks = True
        handles = []
        for p in params:
            was = p.requires_grad
            p.requires_grad_(True)  # a hook needs requires_grad at registration; plans toggle it
            handles.append(p.register_post_accumulate_grad_hook(self._hook))
            p.requires_grad_(was)
        return handles

    @torch.no_grad()
    def _hook(self, p) -> None:
        if self.final_backward:
            if self._host(p.grad.device) != p.grad.device:
                tmp = self._all_reduce(p.grad.cpu())
                p.grad.copy_(tmp)
            else:
                self._all_reduce(p.grad)

    @property
    def reduces_in_hooks(self) -> bool:
        return self._reduced_in_hooks


__all__ = ["Replicas", "agree_signals", "init_from_env", "current", "digest", "full_tensor", "local_part", "shard_like",
           "world_size_from_env", "BUCKET_BYTES", "is_shard", "is_fully_sharded"]


def agree_signals(sync: Replicas, signals, units) -> list[dict[str, float]]:
    """Every signal's unit -> score, the same bits on every rank: additive signals' parts summed over
    ranks before `combine` (a squared norm over the global batch is the sum of the ranks'), the
    others (already global: gradient norms read after reduction, weight norms) taken from rank 0.
    One all-reduce and one broadcast of a vector over every label a signal can report."""
    from .signals import combine_sums, signal_sums

    labels = sorted({u.name for u in units} | {f"block.{i}" for i in range(units.n_blocks)})
    at = {label: j for j, label in enumerate(labels)}
    sums = signal_sums(signals)
    stray = sorted({label for _, label in sums} - set(at))
    if stray:
        raise DynatuneError(f"signal labels {stray[:3]} are not units of this model; they cannot be agreed across ranks.")
    L = len(labels)
    vec = [0.0] * (2 * L * len(signals))
    for (i, label), total in sums.items():
        if signals[i].additive or sync.is_main:
            vec[2 * (i * L + at[label])] = total
            vec[2 * (i * L + at[label]) + 1] = 1.0  # present
    vec = sync.sum_scalars(vec)
    agreed = {(i, label): vec[2 * (i * L + j)] for i in range(len(signals)) for label, j in at.items()
              if vec[2 * (i * L + j) + 1] > 0}
    return combine_sums(signals, agreed)
