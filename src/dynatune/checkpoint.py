"""Resumable checkpoints, written atomically.

A checkpoint is a folder `checkpoints/step-N` holding the weights (safetensors, every parameter
by name, exited blocks included), the engine's state (optimizer state resident and offloaded,
method state, plan, history), the scheduler, the loop's data position and every RNG state. It is
written under a temporary name and renamed into place, and `checkpoints/latest` is replaced
atomically after it, so a write killed midway leaves the previous checkpoint loadable. A
checkpoint damaged after the fact (a truncated file) is skipped for the one before it.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .distributed import full_tensor, shard_like
from .errors import DynatuneError
from .files import usual_permissions

logger = logging.getLogger(__name__)


@dataclass
class LoopState:
    """Where the loop is: restored from a checkpoint so no batch is lost or repeated."""

    step: int = 0          # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of `epoch` already consumed
    evals: list = field(default_factory=list)
    resumed_from_step: int | None = None  # the step this process resumed at (None: a fresh run)
    best: dict | None = None  # the best evaluation so far: {step, metric, value}
    bad_evals: int = 0  # evaluations in a row since `best` that did not improve on it
    best_path: str | None = None  # the best evaluation's weights (load_best), relative to the run directory
    stopped_early_at_step: int | None = None
    grad_scaler: dict | None = None  # amp-fp16: the loss scaler's state (scale, growth tracker)


def save_best(run_dir: Path, tuner, best: dict, weights: dict | None = None) -> str:
    """The weights of the best evaluation in `checkpoints/best`, outside the step-N rotation; the
    new one is complete before the old one goes. `weights`: whole_weights(tuner) when every rank had
    to take part in gathering them (FSDP2). Returns its path relative to `run_dir`."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    tmp, final, old = root / ".best.tmp", root / "best", root / ".best.old"
    for d in (tmp, old):
        shutil.rmtree(d, ignore_errors=True)
    tmp.mkdir()
    if weights is None:
        weights = {n: p.detach().contiguous().cpu() for n, p in tuner.params.items()}
    save_file(weights, tmp / "weights.safetensors")
    usual_permissions(tmp / "weights.safetensors")
    (tmp / "best.json").write_text(json.dumps(best))
    if final.exists():  # a directory cannot be replaced in one rename: move the old one aside first
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return str(final.relative_to(run_dir))


def read_weights(ckpt: Path) -> dict:
    """A checkpoint's weights, whole, by parameter name."""
    return load_file(Path(ckpt) / "weights.safetensors")


def load_weights(ckpt: Path, tuner) -> None:
    """Copy a checkpoint's weights (every parameter by name) into the tuner's parameters."""
    weights = read_weights(ckpt)
    with torch.no_grad():
        for n, p in tuner.params.items():
            p.copy_(weights[n])


def rng_state() -> dict:
    """This process's RNG states (torch, numpy, python, CUDA)."""
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


def whole_weights(tuner) -> dict:
    """Every parameter whole, on the CPU, by name. Under FSDP2 each shard is gathered, so every rank
    calls this, in the same order."""
    return {n: full_tensor(p).detach().contiguous().cpu() for n, p in tuner.params.items()}


def gather(tuner) -> tuple[dict, dict]:
    """(whole_weights, the tuner's state, its optimizer state gathered whole too): what a checkpoint
    holds. Every rank calls it under FSDP2; a checkpoint has one format whatever wrote it, and
    resumes on any number of ranks."""
    return whole_weights(tuner), tuner.state_dict()


def save(run_dir: Path, tuner, scheduler, loop_state: LoopState, keep: int = 2, rng_ranks: list | None = None,
         gathered: tuple[dict, dict] | None = None) -> Path:
    """Write checkpoint step-N. `rng_ranks`: every rank's rng_state() in a data-parallel run (rank 0
    writes the checkpoint alone; each rank resumes its own dropout stream). `gathered`: gather(tuner)
    when every rank had to take part in it (FSDP2)."""
    weights, tuner_state = gathered if gathered is not None else gather(tuner)
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{loop_state.step}"
    tmp = root / f".step-{loop_state.step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(weights, tmp / "weights.safetensors")
    usual_permissions(tmp / "weights.safetensors")
    torch.save({"tuner": tuner_state, "scheduler": scheduler.state_dict(),
                "loop": asdict(loop_state), "rng": rng_state(),
                **({"rng_ranks": rng_ranks} if rng_ranks else {})}, tmp / "state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    pointer = root / ".latest.tmp"
    pointer.write_text(final.name)
    os.replace(pointer, root / "latest")
    done = sorted((d for d in root.glob("step-*") if d.is_dir()), key=_step)
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _pointed(path: str | Path) -> tuple[Path | None, Path]:
    """(the checkpoints folder whose `latest` names the checkpoint, or None when `path` names one
    itself; the checkpoint) for a run directory, its checkpoints folder or a checkpoint folder."""
    p = Path(path)
    for root in (p / "checkpoints", p):
        if (root / "latest").is_file():
            return root, root / (root / "latest").read_text().strip()
    return None, p


def resolve(path: str | Path) -> Path:
    """A run directory (its latest checkpoint) or a checkpoint directory."""
    p = _pointed(path)[1]
    if not (p / "state.pt").is_file() or not (p / "weights.safetensors").is_file():
        raise DynatuneError(f"no checkpoint found at '{path}'; pass a run directory written with "
                            "checkpoint_every > 0, or one of its checkpoints/step-N folders.")
    return p


def _step(d: Path) -> int:
    return int(d.name.split("-")[1])


def _candidates(path: str | Path) -> list[Path]:
    """The checkpoints to try, best first: a run's latest, then its older ones, newest first; a
    checkpoint folder named directly is the only one."""
    root, latest = _pointed(path)
    if root is None:
        return [resolve(path)]
    older = [d for d in root.glob("step-*") if d.is_dir() and _step(d) < _step(latest)]
    return [latest, *sorted(older, key=_step, reverse=True)]


def _read(ckpt: Path):
    """The checkpoint's weights and state, or the reason they cannot be read."""
    try:
        return load_file(ckpt / "weights.safetensors"), torch.load(ckpt / "state.pt", weights_only=False)
    except Exception as err:  # noqa: BLE001 - whatever a damaged file raises, the checkpoint is unusable
        return None, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'unreadable'}"


def load(path, tuner, scheduler, rank: int = 0) -> LoopState:
    """Restore the newest readable checkpoint at `path`; a damaged one is skipped with a warning.
    `rank`: this process's rank in a data-parallel run: it takes its own RNG state when the
    checkpoint holds one per rank (a run on another number of ranks: rank 0's for the ranks it lacks)."""
    failures = []
    for ckpt in _candidates(path):
        weights, state = _read(ckpt)
        if weights is not None:
            break
        failures.append(f"{ckpt.name} ({state})")
        logger.warning("checkpoint %s cannot be read (%s); trying the one before it.", ckpt, state)
    else:
        raise DynatuneError(f"no intact checkpoint to resume from at '{path}': {', '.join(failures)}.")
    missing = set(tuner.params) - set(weights)
    if missing:
        raise DynatuneError(f"checkpoint {ckpt} lacks {len(missing)} parameters of this model (e.g. "
                            f"{sorted(missing)[0]}); resume with the same model and method.")
    with torch.no_grad():
        for n, p in tuner.params.items():
            p.copy_(shard_like(weights[n], p))  # under FSDP2 each rank takes its shard of the whole weight
    tuner.load_state_dict(state["tuner"])
    scheduler.load_state_dict(state["scheduler"])
    ranks = state.get("rng_ranks") or [state["rng"]]
    _set_rng_state(ranks[rank] if rank < len(ranks) else ranks[0])
    loop = LoopState(**{**state["loop"], "resumed_from_step": state["loop"]["step"]})
    logger.warning("resuming at step %d from %s.", loop.step, ckpt)
    return loop


def keep_log_until(log: Path, step: int) -> None:
    """A resumed run's log.jsonl keeps the records of the steps before `step` (the checkpoint's),
    so the steps a killed run logged after its checkpoint do not appear twice. Written atomically."""
    if not log.is_file():
        return
    kept = []
    for line in log.read_text().splitlines(keepends=True):
        try:
            if json.loads(line)["step"] >= step:
                break
        except ValueError:  # a line cut short by the kill: after the checkpoint too
            break
        kept.append(line)
    tmp = log.with_name(log.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, log)
