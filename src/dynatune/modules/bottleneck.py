"""Series and parallel bottleneck adapters (Houlsby et al. 2019; He et al. 2022), on the MLP.

The AdapterHub `adapters` package pins an older transformers, so these are small modules of our own,
as LLM-Adapters (Hu et al. 2023, whose settings IST follows) places them: each wraps one linear of
the MLP and keeps it as `base_layer` (IST's suppression computes the base output from it).

    series:   y = W(x);  y + up(tanh(down(dropout(y))))   on the MLP's up and down projections
    parallel: y = W(x) + up(tanh(down(dropout(x))))       on the MLP's up and gate projections

`up` starts at zero, so a fresh adapter changes nothing. They are merge-free (the tanh sits between
down and up): a finished run saves the adapter weights and the fresh task head with safetensors
(bottleneck_adapter.safetensors) and bottleneck_config.json naming the base model and the wrapped
modules; `load_bottleneck` rebuilds them on that base (`dynatune eval` does).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..errors import DynatuneError
from ..units import find_blocks_path, unwrap_peft

CONFIG_FILE = "bottleneck_config.json"
WEIGHTS_FILE = "bottleneck_adapter.safetensors"
# the MLP's linears, by the end of their names inside a block (tables 8-9: series on Up/Down, parallel on Up/Gate)
TARGETS = {"series": ("mlp.up_proj", "mlp.down_proj", "intermediate.dense", "output.dense"),
           "parallel": ("mlp.up_proj", "mlp.gate_proj", "intermediate.dense")}


class BottleneckAdapter(nn.Module):
    def __init__(self, base_layer: nn.Linear, kind: str, bottleneck: int, dropout: float = 0.0):
        super().__init__()
        if kind not in TARGETS:
            raise DynatuneError(f"unknown bottleneck adapter {kind!r}; use series or parallel.")
        self.base_layer = base_layer
        self.kind = kind
        w = base_layer.weight
        src = base_layer.out_features if kind == "series" else base_layer.in_features
        self.adapter_down = nn.Linear(src, bottleneck, device=w.device, dtype=w.dtype)
        self.adapter_up = nn.Linear(bottleneck, base_layer.out_features, device=w.device, dtype=w.dtype)
        if w.device.type != "meta":
            nn.init.zeros_(self.adapter_up.weight)
            nn.init.zeros_(self.adapter_up.bias)
        self.adapter_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def in_features(self):
        return self.base_layer.in_features

    @property
    def out_features(self):
        return self.base_layer.out_features

    @property
    def weight(self):  # code that reads a linear's weight (dtype, device) still finds it
        return self.base_layer.weight

    def forward(self, x):
        y = self.base_layer(x)
        h = y if self.kind == "series" else x
        return y + self.adapter_up(torch.tanh(self.adapter_down(self.adapter_dropout(h))))


def _is_target(rel: str, kind: str) -> bool:
    if rel.endswith("attention.output.dense"):  # BERT's attention output projection is not the MLP
        return False
    return any(rel == t or rel.endswith("." + t) for t in TARGETS[kind])


def inject_bottleneck(model: nn.Module, kind: str, bottleneck: int, dropout: float = 0.0,
                      names: list[str] | None = None) -> nn.Module:
    """Wrap the MLP linears of every block (or exactly `names`) in bottleneck adapters, in place."""
    blocks_path = find_blocks_path(model)
    if names is None:
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith(blocks_path + ".")
                 and _is_target(n[len(blocks_path) + 1:].split(".", 1)[1], kind)]
    if not names:
        raise DynatuneError(f"no MLP linear for a {kind} adapter in {type(model).__name__} (looked for "
                            f"{', '.join(TARGETS[kind])}); use adapter=lora or dora.")
    for n in names:
        parent, _, child = n.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, child, BottleneckAdapter(getattr(owner, child), kind, bottleneck, dropout))
    model.bottleneck_config = {"kind": kind, "bottleneck": bottleneck, "dropout": dropout, "modules": list(names)}
    return model


def has_bottleneck(model: nn.Module) -> bool:
    return any(isinstance(m, BottleneckAdapter) for m in model.modules())


def save_bottleneck(model: nn.Module, out_dir, tokenizer=None, head_params=()) -> None:
    """The adapters and the fresh task head (safetensors) and the config naming the base model."""
    from safetensors.torch import save_file

    inner = unwrap_peft(model)
    if not inner.name_or_path:
        raise DynatuneError("the adapter cannot name its base model: model.name_or_path is empty; set it to the "
                            "base model's directory before saving.")
    params = dict(model.named_parameters())
    keep = [n for n in params if ".adapter_" in n] + list(head_params)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({n: params[n].detach().contiguous().cpu() for n in keep}, out_dir / WEIGHTS_FILE, metadata={"format": "pt"})
    cfg = {**model.bottleneck_config, "base_model_name_or_path": inner.name_or_path,
           "head": sorted({n.rsplit(".", 1)[0] for n in head_params})}
    (out_dir / CONFIG_FILE).write_text(json.dumps(cfg, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


def is_bottleneck_dir(path) -> bool:
    return (Path(str(path)).expanduser() / CONFIG_FILE).is_file()


def load_bottleneck(model: nn.Module, path) -> nn.Module:
    """Put the saved adapters (and the task head) of `path` onto `model`, its base; nothing may be missing."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg = json.loads((path / CONFIG_FILE).read_text())
    inject_bottleneck(model, cfg["kind"], cfg["bottleneck"], cfg["dropout"], names=cfg["modules"])
    tensors = load_file(path / WEIGHTS_FILE)
    params = dict(model.named_parameters())
    unknown = sorted(set(tensors) - set(params))
    missing = sorted(n for n in params if ".adapter_" in n and n not in tensors)
    if unknown or missing:
        raise DynatuneError(f"{path} does not match its base model ({(unknown or missing)[0]} "
                            f"{'is not in the model' if unknown else 'is missing'}).")
    with torch.no_grad():
        for n, t in tensors.items():
            params[n].copy_(t)
    return model
