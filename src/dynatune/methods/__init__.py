"""Methods are small policies over the engine, registered by name."""
from ..errors import DynatuneError
from .base import METHODS, Method, MethodConfig, config_help, register  # noqa: F401
from . import baselines, adapters  # noqa: F401  (registration)
from . import adagradselect  # noqa: F401  (registration)
from . import trims  # noqa: F401  (registration)


def build_method(name: str, config=None, seed: int = 0) -> Method:
    if name not in METHODS:
        raise DynatuneError(f"unknown method '{name}'; choose one of: {', '.join(sorted(METHODS))}.")
    cls = METHODS[name]
    return cls(config if config is not None else cls.Config(), seed)
