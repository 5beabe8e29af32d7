"""Modules methods inject into a model (SPSFT's row-sparse deltas)."""
from .row_delta import (RowDeltaLinear, RowDeltaVector, merge_all, row_delta_linear, row_delta_modules,  # noqa: F401
                        unmerge_all, unwrap_all)
