"""Adapter baselines through peft: LoRA, DoRA, VeRA on every linear module inside the blocks.

A model that already carries peft adapters is accepted as it is; otherwise adapters are injected
in place (the model keeps its own class, so saving, evaluation and generation do not change).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from ..errors import DynatuneError
from ..plan import Plan
from ..units import find_blocks_path
from .base import Method, MethodConfig, opt, register


@dataclass
class LoraConfig(MethodConfig):
    r: int = opt(8, "adapter rank (capped per module at min(d_in, d_out))")
    alpha: float = opt(16.0, "scaling numerator: the update is scaled by alpha / r")
    dropout: float = opt(0.0, "dropout on the adapter input")
    targets: str = opt("all-linear", "'all-linear' (every linear inside the blocks) or a comma list of module "
                                     "names such as 'q_proj,v_proj'")


def target_linears(model: nn.Module, targets: str) -> dict[str, nn.Linear]:
    blocks_path = find_blocks_path(model)
    wanted = None if targets == "all-linear" else {t.strip() for t in targets.split(",") if t.strip()}
    found = {name: mod for name, mod in model.named_modules()
             if isinstance(mod, nn.Linear) and name.startswith(blocks_path + ".")
             and (wanted is None or name.rsplit(".", 1)[-1] in wanted)}
    if not found:
        raise DynatuneError(f"no linear module inside the blocks matches targets='{targets}'; "
                            "use 'all-linear' or names of linear modules such as 'q_proj,v_proj'.")
    return found


def already_adapted(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") or any("lora_" in n or "vera_" in n for n, _ in model.named_parameters())


@register
class Lora(Method):
    name = "lora"
    Config = LoraConfig
    granularity = "adapter"
    summary = "peft LoRA on every linear in the blocks (rank capped at min(d_in, d_out)); task head trains"
    default_lr = 5e-4

    def peft_config(self, linears: dict[str, nn.Linear]):
        from peft import LoraConfig as PeftLora
        c = self.config
        # exact full names, so 'dense' in a pooler or a head is never adapted by accident
        caps = {re.escape(n): min(m.in_features, m.out_features) for n, m in linears.items()
                if min(m.in_features, m.out_features) < c.r}
        return PeftLora(r=c.r, lora_alpha=c.alpha, lora_dropout=c.dropout, target_modules=list(linears),
                        rank_pattern=caps, use_dora=self.name == "dora")

    def prepare_model(self, model):
        if already_adapted(model):
            return model
        from peft import inject_adapter_in_model
        return inject_adapter_in_model(self.peft_config(target_linears(model, self.config.targets)), model)

    def plan(self, step):
        return self.smallest_plan(self.units)

    def smallest_plan(self, units):
        return Plan.of({u.name for u in units.of_kind("adapter")} | self.fresh_heads(units))

    def cheaper_settings(self, largest):
        return (f"{self.name}.r",)


@register
class Dora(Lora):
    name = "dora"
    summary = "peft DoRA (weight-decomposed LoRA) on every linear in the blocks"


@dataclass
class VeraConfig(LoraConfig):
    r: int = opt(256, "rank of the shared frozen random projections")
    d_initial: float = opt(0.1, "initial value of VeRA's d scaling vector")


@register
class Vera(Lora):
    name = "vera"
    Config = VeraConfig
    summary = "peft VeRA: shared frozen random projections, trained scaling vectors per module"
    default_lr = 4e-3

    def prepare_model(self, model):
        if already_adapted(model):
            return model
        # VeRA's projections are shared state on peft's tuner, so it needs the PeftModel wrapper
        from peft import get_peft_model
        return get_peft_model(model, self.peft_config(target_linears(model, self.config.targets)))

    def peft_config(self, linears):
        from peft import VeraConfig as PeftVera
        c = self.config
        r = min(c.r, min(min(m.in_features, m.out_features) for m in linears.values()))
        return PeftVera(r=r, target_modules=list(linears), vera_dropout=c.dropout, d_initial=c.d_initial)
