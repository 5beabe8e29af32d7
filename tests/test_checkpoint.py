"""Checkpoints are atomic: a write killed midway leaves the previous one loadable."""
import pytest
import torch

import dynatune.checkpoint as ckpt
from dynatune.errors import DynatuneError
from dynatune.loop import LoopState, fit, linear_schedule
from dynatune.methods import build_method

from tiny import causal_lm, collate, lm_examples, loop_cfg


def test_killed_write_leaves_previous_checkpoint_loadable(tmp_path, monkeypatch):
    tuner, state = fit(causal_lm(), build_method("full"), lm_examples(), collate, loop_cfg(max_steps=2))
    sched = linear_schedule(tuner.optimizer, 0, 10)
    ckpt.save(tmp_path, tuner, sched, state)
    saved = {n: p.detach().clone() for n, p in tuner.params.items()}

    with torch.no_grad():  # the run moves on, then dies while writing its next checkpoint
        for p in tuner.params.values():
            p.add_(1.0)

    def die(*a, **k):
        raise KeyboardInterrupt("killed mid-write")
    monkeypatch.setattr(ckpt.torch, "save", die)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(tmp_path, tuner, sched, LoopState(step=3))
    monkeypatch.undo()

    assert (tmp_path / "checkpoints" / "latest").read_text() == "step-2"
    assert not (tmp_path / "checkpoints" / "step-3").exists()
    fresh, _ = fit(causal_lm(seed=7), build_method("full"), lm_examples(), collate, loop_cfg(max_steps=1))
    loop_state = ckpt.load(tmp_path, fresh, linear_schedule(fresh.optimizer, 0, 10))
    assert loop_state.step == 2
    assert all(torch.equal(fresh.params[n], saved[n]) for n in saved)


def test_no_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(DynatuneError, match="no checkpoint found"):
        ckpt.resolve(tmp_path)
