"""Host-resident optimizer state with asynchronous prefetch (AdaGradSelect §3.3).

Every parameter whose state has ever left the device owns one persistent host copy of that
state (pinned memory when CUDA is present). The copy is *updated on every eviction*, so the
host always holds the latest state of every offloaded parameter and nothing is lost when a
unit leaves, returns and leaves again.

- `evict(name, state)`: device -> host into the persistent buffers. On CUDA the copies are
  queued on the current (compute) stream with `non_blocking=True` into pinned memory; the
  device tensors can be released right away because the allocator reuses their memory only
  for work queued after the copy on the same stream.
- `fetch(name, host_state, device)`: host -> device into fresh device tensors. On CUDA the
  copies run on a side stream that first waits for everything already queued on the compute
  stream (an eviction into the same buffer, the previous optimizer step); an event is recorded
  after them, and `wait()` makes the compute stream wait for that event before the optimizer
  step reads the state. The prefetched tensors are `record_stream`-ed on the compute stream so
  their memory is not handed out again while the compute stream may still use it.
- On a CPU-only machine the same calls run with synchronous copies (fresh tensors, never
  aliases), so CI exercises the very code path a GPU run uses.

Under FSDP2 the state of a sharded parameter is a DTensor: the host copy holds this rank's shard
alone (`to_local`), and `fetch` wraps the copy back into a DTensor of the same mesh, placements
and global shape, so each rank offloads and restores only its own part.

Scalars AdamW keeps on the CPU (its `step` counter, unless capturable/fused) are not copied
at all: the same tensor object is handed back, so AdamW finds it where it expects it. Any other
tensor returns to the device it came from.
"""
from __future__ import annotations

import torch


def _stays_put(v) -> bool:
    """Values that never move: non-tensors and CPU scalars (AdamW's `step`)."""
    return not isinstance(v, torch.Tensor) or (v.dim() == 0 and v.device.type == "cpu")


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _local(v: torch.Tensor):
    """(this rank's shard, its DTensor layout) for an FSDP2 DTensor; (v, None) for any other tensor."""
    from torch.distributed.tensor import DTensor
    if isinstance(v, DTensor):
        return v.to_local(), (v.device_mesh, v.placements, v.shape, v.stride())
    return v, None


def _with_layout(t: torch.Tensor, layout) -> torch.Tensor:
    """`t` (a rank's shard) as the DTensor it was taken from; `t` itself when it had no layout."""
    if layout is None:
        return t
    from torch.distributed.tensor import DTensor
    mesh, placements, shape, stride = layout
    return DTensor.from_local(t, mesh, placements, run_check=False, shape=shape, stride=stride)


class HostStateStore:
    """Persistent per-parameter host copies of optimizer state, with side-stream prefetch."""

    def __init__(self):
        self.pin = torch.cuda.is_available()
        self.buffers: dict[str, dict[str, torch.Tensor]] = {}  # name -> key -> host tensor
        self.devices: dict[str, dict[str, torch.device]] = {}  # where each tensor lives when resident
        self.layouts: dict[str, dict[str, tuple]] = {}  # FSDP2: the DTensor each host shard came from
        self._streams: dict[int, torch.cuda.Stream] = {}
        self._pending: dict[int, torch.cuda.Event] = {}  # device index -> last prefetch event

    # -- moving ------------------------------------------------------------------------------------
    def evict(self, name: str, state: dict) -> tuple[dict, int]:
        """Copy `state` into the parameter's host buffers; returns (host state, bytes copied)."""
        bufs = self.buffers.setdefault(name, {})
        devs = self.devices.setdefault(name, {})
        layouts = self.layouts.setdefault(name, {})
        out, moved = {}, 0
        for k, v in state.items():
            if _stays_put(v):
                out[k] = v
                continue
            v, layouts[k] = _local(v)
            cuda = v.device.type == "cuda"
            if cuda:
                self._wait_device(v.device)  # a prefetch may still read this buffer
            buf = bufs.get(k)
            if buf is None or buf.shape != v.shape or buf.dtype != v.dtype:
                buf = torch.empty(v.shape, dtype=v.dtype, device="cpu", pin_memory=self.pin)
                bufs[k] = buf
            buf.copy_(v.detach(), non_blocking=cuda)
            devs[k] = v.device
            out[k] = buf
            moved += _nbytes(v)
        return out, moved

    def fetch(self, name: str, host_state: dict, device: torch.device) -> tuple[dict, int]:
        """Fresh device tensors holding `host_state`; returns (device state, bytes copied)."""
        devs = self.devices.get(name, {})
        layouts = self.layouts.get(name, {})
        out, moved = {}, 0
        for k, v in host_state.items():
            if _stays_put(v):
                out[k] = v
                continue
            dev = devs.get(k, device)
            if dev.type == "cuda":
                t = self._prefetch(v, dev)
            else:
                t = torch.empty(v.shape, dtype=v.dtype, device=dev)
                t.copy_(v)  # a real copy on CPU too: the host buffer is never aliased
            out[k] = _with_layout(t, layouts.get(k))
            moved += _nbytes(v)
        return out, moved

    def adopt(self, name: str, host_state: dict, device: torch.device) -> dict:
        """Take state loaded from a checkpoint as this parameter's host copy (pinned when possible);
        a DTensor (a whole tensor already cut to this rank's shard) keeps only its shard."""
        bufs = self.buffers.setdefault(name, {})
        devs = self.devices.setdefault(name, {})
        layouts = self.layouts.setdefault(name, {})
        out = {}
        for k, v in host_state.items():
            if _stays_put(v):
                out[k] = v
                continue
            v, layouts[k] = _local(v)
            buf = torch.empty(v.shape, dtype=v.dtype, device="cpu", pin_memory=self.pin)
            buf.copy_(v)
            bufs[k] = buf
            devs[k] = device
            out[k] = buf
        return out

    def _prefetch(self, v: torch.Tensor, dev: torch.device) -> torch.Tensor:
        compute = torch.cuda.current_stream(dev)
        side = self._streams.get(dev.index)
        if side is None:
            side = self._streams[dev.index] = torch.cuda.Stream(dev)
        # everything already queued on the compute stream (evictions into these buffers) first
        side.wait_stream(compute)
        with torch.cuda.stream(side):
            t = torch.empty(v.shape, dtype=v.dtype, device=dev)
            t.copy_(v, non_blocking=v.is_pinned())
            ev = torch.cuda.Event()
            ev.record(side)
        t.record_stream(compute)
        self._pending[dev.index] = ev
        return t

    def as_held(self, name: str, key: str, v: torch.Tensor) -> torch.Tensor:
        """A host copy as its parameter holds it: under FSDP2 a DTensor over this rank's shard, on
        the shard's device (so it can be gathered whole); else the host tensor itself."""
        layout = self.layouts.get(name, {}).get(key)
        if layout is None:
            return v
        return _with_layout(v.to(self.devices[name][key]), layout)

    # -- ordering --------------------------------------------------------------------------------
    def _wait_device(self, dev: torch.device) -> None:
        ev = self._pending.pop(dev.index, None)
        if ev is not None:
            torch.cuda.current_stream(dev).wait_event(ev)

    def wait(self) -> None:
        """Make the compute stream wait for every prefetch issued so far (no host blocking)."""
        for idx in list(self._pending):
            self._wait_device(torch.device("cuda", idx))

    def synchronize(self) -> None:
        """Block the host until every copy has landed (before host code reads the buffers)."""
        self.wait()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    # -- accounting ----------------------------------------------------------------------------
    def host_bytes(self) -> int:
        """Bytes of all persistent host copies (offloaded or shadowing resident state)."""
        return sum(_nbytes(t) for bufs in self.buffers.values() for t in bufs.values())
