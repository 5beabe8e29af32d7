"""Integrations with other training frameworks.

`dynatune.integrations.hf`: `DynatuneCallback` (a `transformers.TrainerCallback`), `prepare` and
`DynatuneTrainer`. Imported lazily, so `import dynatune.integrations` does not load transformers.
"""

__all__ = ["DynatuneCallback", "DynatuneTrainer", "prepare"]


def __getattr__(name):
    if name in __all__:
        from . import hf
        return getattr(hf, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
