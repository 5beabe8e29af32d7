"""Budgets: the accepted forms, resolved to bytes, the usable part under a margin, BudgetError."""
from __future__ import annotations

import math
import re

from ..errors import BudgetError, DynatuneError  # noqa: F401  (BudgetError: re-exported)

DEFAULT_MARGIN = 0.03
GiB = 2**30


def fmt_bytes(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if abs(n) >= 2**28 else f"{n / 2**20:.1f} MiB"


BYTE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
BUDGET_FORMS = ("give bytes with a unit and no space (e.g. 12GiB, 500MiB, 12GB, 1.5e9B; units B, KB, MB, GB, "
                "TB, KiB, MiB, GiB, TiB) or a fraction of full fine-tuning's predicted peak in (0, 1] (e.g. 0.6 or 60%)")
_BUDGET_RE = re.compile(r"^(?P<num>[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)(?P<unit>[A-Za-z]*)$")


def _budget_error(value, why: str) -> DynatuneError:
    return DynatuneError(f"budget {value!r} {why}: {BUDGET_FORMS}.")


def parse_budget(value) -> tuple[str, float]:
    """('bytes', n) or ('fraction', f) from a budget value; raises with the accepted forms."""
    if isinstance(value, bool) or value is None:
        raise _budget_error(value, "is not a budget")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value <= 0:
            raise _budget_error(value, "must be positive")
        if value > 1:
            raise _budget_error(value, "is a fraction above 1 (a byte count needs a unit)")
        return "fraction", float(value)
    if not isinstance(value, str):
        raise _budget_error(value, "is not a budget")
    s = value
    if s != s.strip() or " " in s or "\t" in s:
        raise _budget_error(value, "has a space in it")
    if s.endswith("%") and s.count("%") == 1:  # "60%": a percentage of full fine-tuning's peak
        m = _BUDGET_RE.match(s[:-1])
        pct = float(m.group("num")) if m and not m.group("unit") else float("nan")
        if not 0 < pct <= 100:
            raise _budget_error(value, "is not a percentage in (0, 100]")
        return "fraction", pct / 100
    if "%" in s:
        raise _budget_error(value, "uses a percent sign")
    if s.startswith("-"):
        raise _budget_error(value, "is negative")
    if s.startswith("+"):
        s = s[1:]
    m = _BUDGET_RE.match(s)
    if not m:
        raise _budget_error(value, "is not understood")
    num, unit = float(m.group("num")), m.group("unit")
    if not math.isfinite(num) or num <= 0:
        raise _budget_error(value, "must be positive")
    if unit == "":
        if num > 1:
            raise _budget_error(value, "is a fraction above 1 (a byte count needs a unit)")
        return "fraction", num
    if unit not in BYTE_UNITS:
        raise _budget_error(value, f"has an unknown unit {unit!r}")
    n = num * BYTE_UNITS[unit]
    if n < 1:
        raise _budget_error(value, "is less than one byte")
    return "bytes", n


def resolve_budget(value, full_peak_bytes: int | None = None) -> int:
    """A budget in bytes from "12GiB", "500MB", 0.6 (a fraction of full fine-tuning's predicted peak)...

    Accepted: a number with one of the units B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB,
    TiB (powers of 1024), written without a space; or a fraction in (0, 1] (a float, or a string
    such as "0.6"), which needs `full_peak_bytes`. Rejected, each with one sentence that gives the
    accepted forms: spaces ("12 GB"), negative values ("-1"), fractions above 1 ("1.5"), percent
    signs ("200%"), unknown units ("12G") and bare byte counts without a unit.
    """
    kind, x = parse_budget(value)
    if kind == "bytes":
        return int(x)
    if full_peak_bytes is None:
        raise DynatuneError(f"budget {value!r} is a fraction of full fine-tuning, which needs the memory "
                            "model's prediction of full fine-tuning; give bytes (e.g. 12GiB) instead.")
    return int(x * full_peak_bytes)


def usable_budget(budget_bytes: int, margin: float = DEFAULT_MARGIN) -> int:
    """What a plan may be predicted at: budget x (1 - margin)."""
    return int(budget_bytes * (1.0 - margin))


def check_margin(margin: float) -> float:
    if not isinstance(margin, (int, float)) or not 0 <= margin < 1:
        raise DynatuneError(f"margin must be a fraction in [0, 1) of the budget kept free (default 0.03), "
                            f"got {margin!r}.")
    return float(margin)
