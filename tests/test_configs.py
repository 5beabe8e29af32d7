"""Every shipped YAML config loads against the schema and names its own command in its header."""
from pathlib import Path

import pytest
import yaml

from dynatune.config import load_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").rglob("*.yaml"))


def test_there_are_configs():
    assert len(CONFIGS) >= 8


@pytest.mark.parametrize("path", CONFIGS, ids=[f"{p.parent.name}/{p.name}" for p in CONFIGS])
def test_config_loads_and_names_its_command(path):
    first = path.read_text().splitlines()[0]
    assert first == f"# Run: dynatune train --config configs/{path.parent.name}/{path.name}"
    cfg = load_config(str(path))
    raw = yaml.safe_load(path.read_text())
    for key, value in raw.items():  # every value in the file reached the config, sections too
        got = getattr(cfg, key)
        if isinstance(value, dict):
            assert {k: getattr(got, k) for k in value} == value
        else:
            assert got == value
