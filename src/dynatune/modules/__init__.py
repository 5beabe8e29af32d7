"""Modules methods inject into a model: IST's series and parallel bottleneck adapters (bottleneck.py),
SPSFT's row-sparse deltas (row_delta.py)."""
from .row_delta import (RowDeltaLinear, RowDeltaVector, merge_all, row_delta_linear, row_delta_modules,  # noqa: F401
                        unmerge_all, unwrap_all)
