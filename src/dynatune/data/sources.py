"""Where a user's data comes from, read with the `datasets` library: a directory written by
`save_to_disk`, a Parquet or Arrow file, or a dataset name on the Hugging Face Hub.

Each returns plain rows (a list of dicts) for one split, so every task reads them the way it
reads a CSV or JSONL file (tasks.py).
"""
from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

from dynatune.errors import DynatuneError

DATASETS_SUFFIXES = (".parquet", ".arrow")
# what a Hub dataset id looks like ("imdb", "stanfordnlp/imdb"); a local path that does not exist
# but has a file suffix or a path separator beyond owner/name is a missing file instead
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_FILE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".txt", *DATASETS_SUFFIXES)


def looks_like_hub_id(path: str) -> bool:
    return bool(_HUB_ID.match(path)) and not path.lower().endswith(_FILE_SUFFIXES)


def _pick(dd, split: str, where: str):
    """One split of a DatasetDict: the one named `split`, or its only one."""
    if split in dd:
        return dd[split]
    if len(dd) == 1:
        return next(iter(dd.values()))
    raise DynatuneError(f"{where} holds the splits {', '.join(dd)} but no {split!r} split; give each split's "
                        f"path with data.{split}=..., or save a DatasetDict with a {split!r} split.")


def has_split(path: str, split: str) -> bool:
    """Whether the save_to_disk directory at `path` is a DatasetDict with a split named `split`."""
    p = Path(path).expanduser()
    return (p / "dataset_dict.json").is_file() and (p / split).is_dir()


def read_saved(path: Path, split: str) -> list[dict]:
    """Rows of a directory written by Dataset.save_to_disk or DatasetDict.save_to_disk."""
    from datasets import DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as err:
        raise DynatuneError(f"data directory {path} is not a dataset written by save_to_disk "
                            f"({str(err).splitlines()[0]}); give a file, or a directory save_to_disk wrote.") from None
    if isinstance(ds, DatasetDict):
        ds = _pick(ds, split, f"data directory {path}")
    return ds.to_list()


def read_datasets_file(path: Path) -> list[dict]:
    """Rows of a Parquet or Arrow file."""
    from datasets import Dataset

    try:
        if path.suffix.lower() == ".parquet":
            ds = Dataset.from_parquet(str(path))
        else:
            ds = Dataset.from_file(str(path))
    except Exception as err:  # noqa: BLE001 - pyarrow raises many types for a damaged file
        raise DynatuneError(f"data file {path} could not be read as {path.suffix[1:]} "
                            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                            "check that it is a complete file of that format.") from None
    return ds.to_list()


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub's host answers on its port (one quick connection, so that an offline machine
    gets its answer at once instead of after the datasets library's retries)."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def _offline_mode() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def read_hub(name: str, split: str, setting: str) -> list[dict]:
    """Rows of one split of the Hub dataset `name` (datasets.load_dataset; from its cache when offline)."""
    from datasets import load_dataset

    offline = _offline_mode()
    if not offline and not hub_reachable():
        raise DynatuneError(
            f"{setting}={name} is not a local file or directory, and the Hugging Face Hub cannot be reached to load "
            f"it as a dataset; give a local file (CSV, JSONL, Parquet) or a directory written by save_to_disk "
            f"(where there is a network: datasets.load_dataset({name!r}).save_to_disk(DIR)).")
    try:
        dd = load_dataset(name)
    except Exception as err:  # noqa: BLE001 - the datasets library raises many types for a missing dataset
        where = "in the local cache (offline mode)" if offline else "on the Hugging Face Hub"
        raise DynatuneError(f"{setting}={name} is not a local file or directory, and loading it {where} failed "
                            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); check "
                            "the name, or give a local file.") from None
    return _pick(dd, split, f"Hub dataset {name}").to_list()
