"""Resumable checkpoints, written atomically.

A checkpoint is a folder `checkpoints/step-N` holding the weights (safetensors, every parameter
by name, exited blocks included), the engine's state (optimizer state resident and offloaded,
method state, plan, history), the scheduler, the loop's data position and every RNG state. It is
written under a temporary name and renamed into place, and `checkpoints/latest` is replaced
atomically after it, so a write killed midway leaves the previous checkpoint loadable.
"""
from __future__ import annotations

import logging
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .errors import DynatuneError

logger = logging.getLogger(__name__)


@dataclass
class LoopState:
    """Where the loop is: restored from a checkpoint so no batch is lost or repeated."""

    step: int = 0          # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of `epoch` already consumed
    evals: list = field(default_factory=list)
    resumed_from_step: int | None = None  # the step this process resumed at (None: a fresh run)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(run_dir: Path, tuner, scheduler, loop_state: LoopState, keep: int = 2) -> Path:
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{loop_state.step}"
    tmp = root / f".step-{loop_state.step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({n: p.detach().contiguous().cpu() for n, p in tuner.params.items()}, tmp / "weights.safetensors")
    torch.save({"tuner": tuner.state_dict(), "scheduler": scheduler.state_dict(),
                "loop": asdict(loop_state), "rng": _rng_state()}, tmp / "state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    pointer = root / ".latest.tmp"
    pointer.write_text(final.name)
    os.replace(pointer, root / "latest")
    done = sorted((d for d in root.glob("step-*") if d.is_dir()), key=lambda d: int(d.name.split("-")[1]))
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def resolve(path: str | Path) -> Path:
    """A run directory (its latest checkpoint) or a checkpoint directory."""
    p = Path(path)
    if (p / "checkpoints" / "latest").is_file():
        p = p / "checkpoints" / (p / "checkpoints" / "latest").read_text().strip()
    elif (p / "latest").is_file():
        p = p / (p / "latest").read_text().strip()
    if not (p / "state.pt").is_file() or not (p / "weights.safetensors").is_file():
        raise DynatuneError(f"no checkpoint found at '{path}'; pass a run directory written with "
                            "checkpoint_every > 0, or one of its checkpoints/step-N folders.")
    return p


def load(path, tuner, scheduler) -> LoopState:
    ckpt = resolve(path)
    weights = load_file(ckpt / "weights.safetensors")
    missing = set(tuner.params) - set(weights)
    if missing:
        raise DynatuneError(f"checkpoint {ckpt} lacks {len(missing)} parameters of this model (e.g. "
                            f"{sorted(missing)[0]}); resume with the same model and method.")
    with torch.no_grad():
        for n, p in tuner.params.items():
            p.copy_(weights[n])
    state = torch.load(ckpt / "state.pt", weights_only=False)
    tuner.load_state_dict(state["tuner"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    loop = LoopState(**{**state["loop"], "resumed_from_step": state["loop"]["step"]})
    logger.warning("resuming at step %d from %s.", loop.step, ckpt)
    return loop
