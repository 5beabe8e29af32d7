"""Methods are small policies over the engine, registered by name."""
from dataclasses import fields, replace

from ..errors import DynatuneError
from .base import METHODS, Method, MethodConfig, config_help, register  # noqa: F401
from . import baselines, adapters  # noqa: F401  (registration)
from . import adagradselect  # noqa: F401  (registration)
from . import trims  # noqa: F401  (registration)
from . import dynalora  # noqa: F401  (registration)
from . import ist  # noqa: F401  (registration)
from . import spsft  # noqa: F401  (registration)


def build_method(name: str, config=None, seed: int = 0, *, budget=None, **options) -> Method:
    """A method by name: `build_method("trims", budget=0.6, tau=20, seed=1)`.

    options: the method's own options as keywords (`dynatune ls` lists them), applied over `config`
    (the method's Config dataclass) when one is given. budget: bytes with a unit ("12GiB"), a
    fraction or percentage of full fine-tuning's predicted peak (0.6, "60%"), or a byte count (int);
    the loop and the Trainer callback run the method under it (a budget given there too is an error).
    """
    if name not in METHODS:
        raise DynatuneError(f"unknown method '{name}'; choose one of: {', '.join(sorted(METHODS))}.")
    cls = METHODS[name]
    known = {f.name for f in fields(cls.Config)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise DynatuneError(f"method '{name}' has no option {', '.join(unknown)}; its options are: "
                            f"{', '.join(sorted(known))}.")
    config = config if config is not None else cls.Config()
    if options:
        config = replace(config, **options)
    method = cls(config, seed)
    method.budget = budget
    return method
