"""dynatune: fine-tune transformers under a memory budget by choosing, while training, what trains.

    import dynatune
    method = dynatune.build_method("trims", budget=0.6, tau=20)
    model = dynatune.prepare(model, method)
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[dynatune.DynatuneCallback(method)])

Names are imported on first use, so `import dynatune` stays light (no transformers import).
"""
from __future__ import annotations

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("dynatune")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

# public name -> the module that defines it
_PUBLIC = {
    "build_method": "dynatune.methods",
    "METHODS": "dynatune.methods",
    "Method": "dynatune.methods",
    "Plan": "dynatune.plan",
    "Tuner": "dynatune.engine",
    "DynatuneCallback": "dynatune.integrations.hf",
    "DynatuneTrainer": "dynatune.integrations.hf",
    "prepare": "dynatune.integrations.hf",
    "estimate": "dynatune.planner",
    "DynatuneError": "dynatune.errors",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name):
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'dynatune' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
