"""Byte counting from live storage.

Everything here reads the tensors that really exist (CPU and CUDA alike), deduplicated by
storage, so that a plan's savings are shown, not assumed:
- weights: parameter storages resident on the training device;
- gradients: `.grad` tensors that exist;
- optimizer state: the optimizer's actual state tensors on the device (state offloaded to host
  memory is reported apart as `offloaded_bytes`);
- saved activations: tensors autograd saves for backward, caught with saved_tensors_hooks and
  attributed to the block that was running when they were saved (those still held when backward
  starts: what a graph dropped during the forward saved is not counted).

`counted_step_bytes = weights + gradients + optimizer state + saved activations`; the run's
`counted_peak_bytes` is the largest over its steps.

Under activation checkpointing (non-reentrant) a checkpointed block runs inside checkpoint's own
saved_tensors_hooks, which take precedence over the counter's: what the counter sees is what
checkpoint keeps through the forward (each block's input, saved outside those hooks) plus
everything saved outside the blocks. The block's activations that backward recomputes, one block
at a time, never pass the counter; the memory model prices them as the `backward_recompute`
phase of the predicted peak, not as counted bytes.
"""
from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn


def storage_key(t: torch.Tensor) -> tuple:
    s = t.untyped_storage()
    return (t.device.type, t.device.index, s.data_ptr())


def unique_bytes(tensors, device: torch.device | None = None, exclude: set | None = None) -> int:
    """Bytes of the distinct storages behind `tensors` (optionally only those on `device`)."""
    seen = set(exclude or ())
    total = 0
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor):
            continue
        if device is not None and t.device.type != device.type:
            continue
        key = storage_key(t)
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


def weight_bytes(params, device) -> int:
    return unique_bytes(params, device)


def grad_bytes(params, device) -> int:
    return unique_bytes((p.grad for p in params), device)


def optimizer_state_tensors(optimizer: torch.optim.Optimizer):
    for state in optimizer.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                yield v


def optimizer_bytes(optimizer: torch.optim.Optimizer, device) -> int:
    return unique_bytes(optimizer_state_tensors(optimizer), device)


@dataclass
class SavedTensorCounter:
    """Counts tensors saved for backward during a forward pass, by block.

    Storages that belong to parameters are not counted (saving a weight for backward costs
    nothing extra), but a bf16 copy of a weight made under autocast is: it is new memory.

    Only what backward can still use counts: the saved storages alive when a backward starts (its
    first unpack), or, for a forward whose backward has not started (the memory model's probe),
    those alive when the count is read. A graph the forward builds and drops (peft DoRA's
    lora_B(lora_A(eye)), used only detached) saves tensors that are freed before backward; they
    do not count, and a later tensor saved at the address one of them freed does. With several
    backward passes per count (gradient accumulation) the largest one's saved bytes count.
    """

    device: torch.device
    block_of_module: dict = field(default_factory=dict)  # id(module) -> label
    kernels: set = field(default_factory=set)
    _saved: dict = field(default_factory=dict)   # storage key -> [label, bytes, weakrefs to the packed tensors]
    _settled: dict = field(default_factory=dict)  # label -> bytes, held when a backward started
    _pending: bool = False  # saved since the last backward started
    _stack: list = field(default_factory=list)
    _param_keys: set = field(default_factory=set)
    _handles: list = field(default_factory=list)

    def attach(self, labelled_modules: dict[str, nn.Module], params) -> None:
        """Track which labelled module (e.g. 'block.3') is running while tensors are saved."""
        self._param_keys = {storage_key(p) for p in params}
        for label, mod in labelled_modules.items():
            self._handles.append(mod.register_forward_pre_hook(self._enter(label)))
            self._handles.append(mod.register_forward_hook(self._leave))

    def _enter(self, label):
        def hook(mod, args):
            self._stack.append(label)
        return hook

    def _leave(self, mod, args, out):
        if self._stack:
            self._stack.pop()

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def reset(self) -> None:
        self._saved = {}
        self._settled = {}
        self._pending = False
        self._stack = []

    @staticmethod
    def _alive(entry) -> bool:
        return any(r() is not None for r in entry[2])

    def _held(self) -> dict:
        """label -> bytes of the saved storages alive now."""
        out: dict = {}
        for entry in self._saved.values():
            if self._alive(entry):
                out[entry[0]] = out.get(entry[0], 0) + entry[1]
        return out

    def _settle(self) -> None:
        """A backward starts: what is saved now is what it holds (the largest of several backwards)."""
        held = self._held()
        if sum(held.values()) > sum(self._settled.values()):
            self._settled = held
        self._saved = {k: e for k, e in self._saved.items() if self._alive(e)}
        self._pending = False

    @property
    def by_block(self) -> dict:
        best = self._settled
        if self._pending:  # a forward whose backward has not started: what it holds now
            held = self._held()
            if sum(held.values()) > sum(best.values()):
                best = held
        return dict(best)

    @property
    def total(self) -> int:
        return sum(self.by_block.values())

    def _pack(self, t: torch.Tensor):
        # Detached: a saved output kept with its grad_fn would own the node that saves it, a cycle
        # through C++ that gc cannot break when backward never runs (the memory model's probes, a
        # forward that ran out of memory). Autograd puts the grad_fn back when it unpacks.
        out = t.detach()
        if t.device.type == self.device.type:
            if t.layout == torch.sparse_coo:  # (peft SHiRA's delta) no storage of its own: its values and indices
                vals, idx = t._values(), t._indices()
                key, nbytes = storage_key(vals), vals.untyped_storage().nbytes() + idx.untyped_storage().nbytes()
            else:
                key, nbytes = storage_key(t), None
            if key not in self._param_keys:
                entry = self._saved.get(key)
                if entry is None or not self._alive(entry):  # new, or an address a freed one left
                    label = self._stack[-1] if self._stack else "outside"
                    nbytes = t.untyped_storage().nbytes() if nbytes is None else nbytes
                    entry = self._saved[key] = [label, nbytes, []]
                entry[2].append(weakref.ref(out))
                self._pending = True
        return out

    def _unpack(self, t: torch.Tensor):
        if self._pending:
            self._settle()
        return t

    @contextmanager
    def counting(self):
        self.reset()
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            yield self


@dataclass
class MemoryRecord:
    """One step's counted bytes, by term."""

    weights: int = 0
    gradients: int = 0
    optimizer: int = 0
    activations: int = 0
    offloaded: int = 0
    measured: int = 0  # CUDA only: torch.cuda.max_memory_allocated over the step

    @property
    def counted(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations

    def to_dict(self) -> dict:
        return {"weights": self.weights, "gradients": self.gradients, "optimizer": self.optimizer,
                "activations": self.activations, "offloaded": self.offloaded, "counted": self.counted,
                **({"measured": self.measured} if self.measured else {})}
