"""Optimizer state that follows the plan.

One optimizer holds every candidate parameter (AdamW skips parameters whose grad is None), so a
unit selected late is already in it and really updates. When a unit leaves the plan its state is
kept, dropped (LISA's memory fix: peers that never free it grow at every switch) or offloaded to
host memory and restored, bit for bit, when the unit returns. State dicts are keyed by parameter
names, never tensor ids.
"""
from __future__ import annotations

import torch
from torch import nn

from .distributed import full_tensor, is_shard, shard_like
from .errors import DynatuneError
from .memory import unique_bytes
from .offload import HostStateStore

STATE_POLICIES = ("keep", "drop", "offload")


def linear_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """The run's learning-rate shape: linear warm-up to the peak, then linear decay to zero."""
    if step < warmup_steps:
        return (step + 1) / max(1, warmup_steps)
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def ensure_in_optimizer(optimizer: torch.optim.Optimizer, params: dict[str, nn.Parameter]) -> list[str]:
    """Add candidate parameters the optimizer was built without (e.g. frozen when a Trainer made it).

    They join a new group that copies the first group's hyper-parameters. Returns the added names.
    """
    have = {id(p) for g in optimizer.param_groups for p in g["params"]}
    missing = [(n, p) for n, p in params.items() if id(p) not in have]
    if missing:
        group = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
        group["params"] = [p for _, p in missing]
        optimizer.add_param_group(group)
    return [n for n, _ in missing]


class OptimizerStates:
    """Moves per-parameter optimizer state as units enter and leave the plan."""

    def __init__(self, optimizer: torch.optim.Optimizer, named_params: dict[str, nn.Parameter],
                 policy: str = "keep", all_params: dict[str, nn.Parameter] | None = None):
        """named_params: the candidates, whose state moves; all_params: every parameter the optimizer
        may hold (a Trainer's optimizer also holds parameters no plan ever trains), for naming groups."""
        if policy not in STATE_POLICIES:
            raise DynatuneError(f"unknown optimizer-state policy '{policy}'; use one of {', '.join(STATE_POLICIES)}.")
        self.optimizer = optimizer
        self.params = named_params
        self.name_of = {id(p): n for n, p in (all_params or named_params).items()}
        self.policy = policy
        self.host: dict[str, dict] = {}  # name -> offloaded state (host memory)
        self.bytes_moved = 0  # host<->device traffic since the last reset (logged per step)
        # offload: persistent per-parameter host copies (pinned on CUDA), updated on every eviction,
        # and prefetch on a side stream (offload.py); `ready()` orders the optimizer step after it
        self.store = HostStateStore() if policy == "offload" else None

    def set_policy(self, policy: str) -> None:
        """Change the policy before any unit has left the plan (the engine does it under a budget
        that keep could outgrow)."""
        if policy not in STATE_POLICIES:
            raise DynatuneError(f"unknown optimizer-state policy '{policy}'; use one of {', '.join(STATE_POLICIES)}.")
        if self.host:
            raise DynatuneError("the optimizer-state policy cannot change once state has been offloaded.")
        self.policy = policy
        self.store = HostStateStore() if policy == "offload" else None

    # -- moving state -------------------------------------------------------------------------
    def leave(self, names) -> None:
        """Units whose parameters left the plan: apply the policy to their state."""
        if self.policy == "keep":
            return
        for n in names:
            p = self.params[n]
            state = self.optimizer.state.pop(p, None)
            if not state or self.policy == "drop":
                continue
            self.host[n], moved = self.store.evict(n, state)
            self.bytes_moved += moved

    def enter(self, names) -> None:
        """Parameters that (re)join the plan get their offloaded state back before they step."""
        for n in names:
            state = self.host.pop(n, None)
            if state is not None:
                p = self.params[n]
                if self.store is not None:
                    self.optimizer.state[p], moved = self.store.fetch(n, state, p.device)
                    self.bytes_moved += moved
                else:  # offloaded by a checkpoint, resumed under another policy
                    self.optimizer.state[p] = {k: self._to_device(v, p) for k, v in state.items()}

    def ready(self) -> None:
        """Called before the optimizer step: it must see every prefetched state (no-op on CPU)."""
        if self.store is not None:
            self.store.wait()

    def _to_device(self, v, p):
        """A whole state tensor as parameter `p` holds its state: on p's device, cut to p's shard
        under FSDP2."""
        if not isinstance(v, torch.Tensor) or v.dim() == 0 and v.device.type == "cpu":
            return v
        self.bytes_moved += v.numel() * v.element_size()
        if p.device.type == "cpu" or is_shard(p):
            return shard_like(v.clone(), p)  # a real copy, so the same code path is tested in CI
        out = torch.empty(v.shape, dtype=v.dtype, device=p.device)
        out.copy_(v, non_blocking=True)
        return out

    # -- accounting ------------------------------------------------------------------------------
    def resident_bytes(self, device: torch.device) -> int:
        tensors = (v for s in self.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor))
        return unique_bytes(tensors, device)

    def offloaded_bytes(self) -> int:
        return unique_bytes(v for s in self.host.values() for v in s.values() if isinstance(v, torch.Tensor))

    # -- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Every parameter's state by name, resident and offloaded alike, plus the groups' settings."""
        if self.store is not None:
            self.store.synchronize()  # asynchronous evictions must have landed before the host reads
        state = {}
        for p, s in self.optimizer.state.items():  # FSDP2 shards are gathered whole (every rank, same order)
            state[self.name_of[id(p)]] = {k: (full_tensor(v).detach().cpu().clone() if isinstance(v, torch.Tensor)
                                              else v) for k, v in s.items()}
        for n, s in self.host.items():  # under FSDP2 each host copy is a shard: gathered whole too
            state[n] = {"__offloaded__": True, **{k: (self._whole_host(n, k, v) if isinstance(v, torch.Tensor) else v)
                                                   for k, v in s.items()}}
        groups = [{**{k: v for k, v in g.items() if k != "params"},
                   "params": [self.name_of[id(p)] for p in g["params"]]} for g in self.optimizer.param_groups]
        return {"state": state, "groups": groups, "policy": self.policy}

    def _whole_host(self, name: str, key: str, v: torch.Tensor) -> torch.Tensor:
        if self.store is None or v.dim() == 0:
            return v.clone()
        return full_tensor(self.store.as_held(name, key, v)).detach().cpu().clone()

    def load_state_dict(self, sd: dict) -> None:
        self.optimizer.state.clear()
        self.host.clear()
        for g, saved in zip(self.optimizer.param_groups, sd["groups"]):
            names = [self.name_of[id(p)] for p in g["params"]]
            if names != saved["params"]:
                raise DynatuneError("the checkpoint's optimizer groups do not match this model's parameters; "
                                    "resume with the same model, method and options.")
            g.update({k: v for k, v in saved.items() if k != "params"})
        for n, s in sd["state"].items():
            s = dict(s)
            p = self.params[n]
            if s.pop("__offloaded__", False):  # FSDP2: the store keeps this rank's shard of each tensor
                self.host[n] = (self.store.adopt(n, {k: shard_like(v, p) if isinstance(v, torch.Tensor) and v.dim() > 0
                                                     else v for k, v in s.items()}, p.device)
                                if self.store is not None else s)
            else:
                self.optimizer.state[p] = {k: (shard_like(v, p) if isinstance(v, torch.Tensor) and v.dim() > 0 else v)
                                           for k, v in s.items()}


def split_into_unit_groups(optimizer: torch.optim.Optimizer, unit_params: dict[str, list[nn.Parameter]]) -> None:
    """Before any step: move each unit's parameters out of the optimizer's groups into groups of
    their own, one per (unit, original group), with that group's hyperparameters (a Trainer's
    decay / no-decay split survives). Per-unit learning rates need them; no state exists yet."""
    if optimizer.state:
        raise DynatuneError("the optimizer has already stepped; per-unit parameter groups are made before the first "
                            "step.")
    owner = {id(p): u for u, ps in unit_params.items() for p in ps}
    groups = []
    for group in optimizer.param_groups:
        hyper = {k: v for k, v in group.items() if k != "params"}
        rest, by_unit = [], {}
        for p in group["params"]:
            if id(p) in owner:
                by_unit.setdefault(owner[id(p)], []).append(p)
            else:
                rest.append(p)
        if rest:
            groups.append({**hyper, "params": rest})
        groups += [{**hyper, "params": ps} for ps in by_unit.values()]
    optimizer.param_groups = groups


def unit_groups(optimizer: torch.optim.Optimizer, unit_param_ids: dict[str, set[int]], method: str
                ) -> dict[str, list[dict]]:
    """unit -> the optimizer groups holding its parameters, when every such group holds that unit's
    parameters alone (per-unit learning rates set a group's rate); else one sentence."""
    out: dict[str, list[dict]] = {}
    for unit, ids in unit_param_ids.items():
        mine = [g for g in optimizer.param_groups if any(id(p) in ids for p in g["params"])]
        if any(id(p) not in ids for g in mine for p in g["params"]):
            raise DynatuneError(f"{method}'s per-unit learning rates need each unit's parameters in optimizer groups "
                                "of their own; use dynatune.integrations.hf.DynatuneTrainer (it makes them) instead of "
                                "a plain Trainer, or build the optimizer with one group per unit.")
        out[unit] = mine
    return out
