"""What every method shares: a config dataclass, a registry, and the fresh-head rule."""
from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields

import torch

from ..errors import DynatuneError
from ..plan import Plan

METHODS: dict[str, type["Method"]] = {}


def register(cls):
    """Class decorator: makes the method reachable by name from the CLI, YAML and `dynatune ls`."""
    METHODS[cls.name] = cls
    return cls


def opt(default, help: str):
    """A config field with help text (shown by `dynatune ls`)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class MethodConfig:
    train_head: bool = opt(True, "always train a freshly initialised task head (it has no pretrained values)")
    state_policy: str = opt("keep", "optimizer state of units that leave the plan: keep, drop or offload")


def config_help(cfg_cls) -> list[tuple[str, object, str]]:
    """(name, default, help) of each option, for `dynatune ls` and the docs."""
    out = []
    for f in fields(cfg_cls):
        default = f.default_factory() if f.default is MISSING else f.default  # type: ignore[misc]
        out.append((f.name, default, f.metadata.get("help", "")))
    return out


class Method:
    """A policy: reads signals and (with a budget) the memory model, returns the next Plan.

    Subclasses set `name`, `Config`, and override `plan`; most need nothing else.
    """

    name = "base"
    Config = MethodConfig
    granularity = "block"
    signals: tuple[str, ...] = ()
    default_lr = 5e-5
    default_budget: str | None = None  # used when the run sets no budget (a budgeted method's own)
    summary = ""

    def __init__(self, config: MethodConfig | None = None, seed: int = 0):
        self.config = config if config is not None else self.Config()
        # the method's own generator: selection never touches the global RNG (dropout's)
        self.generator = torch.Generator().manual_seed(seed)

    # -- hooks the engine calls ---------------------------------------------------------------------
    def prepare_model(self, model):
        """Wrap or modify the model before it is partitioned (adapters are injected here)."""
        return model

    def setup(self, tuner) -> None:
        self.tuner = tuner
        self.units = tuner.units

    def candidates(self) -> list[str]:
        """Units that may ever update: the optimizer is built over all of them up front."""
        return [u.name for u in self.units]

    def plan(self, step: int) -> Plan:
        raise NotImplementedError

    def smallest_plan(self, units) -> Plan:
        """The least memory this method can run with: budgets below its price are refused up front.
        Default: the fresh task head alone, else the last block."""
        fresh = self.fresh_heads(units)
        return Plan.of(fresh) if fresh else Plan.of(u.name for u in units.in_block(units.n_blocks - 1))

    def after_backward(self, step: int, signals: dict) -> frozenset | None:
        return None

    def end_step(self, step: int, loss: float | None) -> None:
        pass

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, sd: dict) -> None:
        self.generator.set_state(sd["generator"])

    # -- helpers -----------------------------------------------------------------------------------
    def fresh_heads(self, units) -> set[str]:
        return {u.name for u in units.fresh_heads} if self.config.train_head else set()

    def with_head(self, names) -> set[str]:
        return set(names) | self.fresh_heads(self.units)

    def block_units(self, indices) -> set[str]:
        return {f"block.{i}" for i in indices}

    def check_k(self, k: int, what: str = "k") -> int:
        n = self.units.n_blocks
        if not 1 <= k <= n:
            raise DynatuneError(f"{self.name}.{what}={k} is outside 1..{n} (the model has {n} blocks).")
        return k
