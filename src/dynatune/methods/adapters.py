"""Adapter baselines through peft: LoRA, DoRA, VeRA on every linear module inside the blocks.

A model that already carries peft adapters is accepted as it is; otherwise adapters are injected
in place (the model keeps its own class, so evaluation and generation do not change). A finished
run saves a peft adapter (`export`), with the fresh task head as `modules_to_save`, and on request
the merged model.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..errors import DynatuneError
from ..plan import Plan
from ..units import already_adapted, find_blocks_path, get_submodule, unwrap_peft
from .base import Method, MethodConfig, opt, register


@dataclass
class LoraConfig(MethodConfig):
    r: int = opt(8, "adapter rank (capped per module at min(d_in, d_out))")
    alpha: float = opt(16.0, "scaling numerator: the update is scaled by alpha / r")
    dropout: float = opt(0.0, "dropout on the adapter input")
    targets: str = opt("all-linear", "'all-linear' (every linear inside the blocks) or a comma list of module "
                                     "names such as 'q_proj,v_proj'")
    blocks: str = opt("all", "blocks that carry adapters: 'all', 'top:N' (the N highest: backward stops below "
                             "them) or a comma list of block indices from 0")


def adapted_blocks(blocks: str, n_blocks: int) -> set[int]:
    """Block indices named by a `blocks` option: 'all', 'top:N' or '0,3,5'."""
    spec = str(blocks).strip()
    try:
        if spec == "all":
            chosen = set(range(n_blocks))
        elif spec.startswith("top:"):
            n = int(spec[4:])
            chosen = set(range(n_blocks - n, n_blocks)) if 1 <= n <= n_blocks else set()
        else:
            chosen = {int(b) for b in spec.split(",") if b.strip()}
    except ValueError:
        chosen = set()
    if not chosen or not chosen <= set(range(n_blocks)):
        raise DynatuneError(f"blocks='{blocks}' names no valid blocks of this model's {n_blocks}; use 'all', "
                            f"'top:N' with 1 <= N <= {n_blocks}, or block indices from 0 to {n_blocks - 1}.")
    return chosen


def present_targets(model: nn.Module, targets: str) -> str:
    """The configured module names the model has: defaults name both BERT's and Llama's linears
    ('query,value,q_proj,v_proj'); none present: as given, so target_linears names the problem."""
    if targets == "all-linear":
        return targets
    names = [n.strip() for n in targets.split(",") if n.strip()]
    have = {name.rsplit(".", 1)[-1] for name in target_linears(model, "all-linear")}
    present = [n for n in names if n in have]
    return ",".join(present) if present else targets


def target_linears(model: nn.Module, targets: str, blocks: str = "all") -> dict[str, nn.Linear]:
    blocks_path = find_blocks_path(model)
    wanted = None if targets == "all-linear" else {t.strip() for t in targets.split(",") if t.strip()}
    keep = adapted_blocks(blocks, len(get_submodule(model, blocks_path)))
    found = {name: mod for name, mod in model.named_modules()
             if isinstance(mod, nn.Linear) and name.startswith(blocks_path + ".")
             and int(name[len(blocks_path) + 1:].split(".", 1)[0]) in keep
             and (wanted is None or name.rsplit(".", 1)[-1] in wanted)}
    if not found:
        raise DynatuneError(f"no linear module inside the blocks matches targets='{targets}'; "
                            "use 'all-linear' or names of linear modules such as 'q_proj,v_proj'.")
    return found


@register
class Lora(Method):
    name = "lora"
    Config = LoraConfig
    granularity = "adapter"
    summary = "peft LoRA on every linear in the blocks (rank capped at min(d_in, d_out)); task head trains"
    default_lr = 5e-4
    updates_base_weights = False

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
        return inject_adapter_in_model(self.peft_config(target_linears(model, self.config.targets, self.config.blocks)), model)

    def plan(self, step):
        return self.smallest_plan(self.units)

    def smallest_plan(self, units):
        return Plan.of({u.name for u in units.of_kind("adapter")} | self.fresh_heads(units))

    def cheaper_settings(self, largest):
        return (f"{self.name}.r",)

    def export(self, model, out_dir, tokenizer=None, merged=False):
        """A peft adapter (adapter_config.json naming the base model, adapter_model.safetensors) that
        `PeftModel.from_pretrained(base, out_dir)` loads, with the fresh task head as modules_to_save
        (the base model has none); with `merged`, the merged model in out_dir/merged as well, loadable
        with plain from_pretrained (merged in place: `model` keeps no adapters afterwards)."""
        from peft import PeftModel, get_peft_model_state_dict
        from safetensors.torch import save_file

        inner = unwrap_peft(model)
        if not inner.name_or_path:
            raise DynatuneError("the adapter cannot name its base model: model.name_or_path is empty; set it to the "
                                "base model's directory before saving.")
        prefix = "base_model.model."  # how a PeftModel names the wrapped model's weights
        tensors = get_peft_model_state_dict(model)
        if not isinstance(model, PeftModel):  # injected in place
            tensors = {prefix + k: v for k, v in tensors.items()}
        config = copy.deepcopy(model.peft_config["default"])
        heads = set(config.modules_to_save or ())
        params = dict(model.named_parameters())
        for name in (p for u in self.units.fresh_heads for p in u.param_names):
            if "modules_to_save" in name:  # peft's own copy of a head: in the adapter state already
                continue
            key = name if name.startswith(prefix) else prefix + name
            tensors[key] = params[name]
            heads.add(key[len(prefix):].rsplit(".", 1)[0])
        config.modules_to_save = sorted(heads) or None
        config.base_model_name_or_path = inner.name_or_path
        config.inference_mode = True
        # lets AutoPeftModelFor... pick the model class
        config.task_type = next((t for cls, t in (("ForCausalLM", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"))
                                 if type(inner).__name__.endswith(cls)), None)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, out_dir / "adapter_model.safetensors",
                  metadata={"format": "pt"})
        config.save_pretrained(out_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(out_dir)
        if merged:
            plain = model.merge_and_unload() if isinstance(model, PeftModel) else merge_injected(inner)
            super().export(plain, out_dir / "merged", tokenizer)


def merge_injected(model: nn.Module) -> nn.Module:
    """Merge adapters injected in place (no PeftModel to call merge_and_unload on) into their base
    layers and put the base layers back: a plain transformers model again."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.get_base_layer())
    del model.peft_config
    return model


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
        # VeRA's projections are shared state on peft's tuner, so it needs the PeftModel wrapper; its
        # adapters take the model's dtype, as injected LoRA's do (pure bf16 is bf16 throughout)
        from peft import get_peft_model
        return get_peft_model(model, self.peft_config(target_linears(model, self.config.targets, self.config.blocks)),
                              autocast_adapter_dtype=False)

    def peft_config(self, linears):
        from peft import VeraConfig as PeftVera
        c = self.config
        r = min(c.r, min(min(m.in_features, m.out_features) for m in linears.values()))
        return PeftVera(r=r, target_modules=list(linears), vera_dropout=c.dropout, d_initial=c.d_initial)
