"""Saved files get the permissions of any file the user creates: 0666 less the umask.

safetensors (0.8) writes a file as a temporary file created 0600 (Rust's tempfile) renamed into
place, so without this a saved model or checkpoint would be readable by its owner alone.
"""
from __future__ import annotations

import os
from pathlib import Path


def usual_permissions(path) -> None:
    """Give the file at `path`, or every file under the directory `path`, mode 0666 & ~umask."""
    umask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(umask)
    path = Path(path)
    for f in [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]:
        os.chmod(f, 0o666 & ~umask)
