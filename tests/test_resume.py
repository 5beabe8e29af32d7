"""`dynatune train --resume RUN`: the run's own config, a checkpoint after every kind of step, an
honest log, damaged checkpoints and a run killed with SIGKILL all resume to the straight run."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from dynatune.cli import main

TOTAL = 12  # optimizer steps: 48 examples / 4 per step, one epoch unless a case says otherwise


def common(model_dir, *extra):
    return [f"model={model_dir}", "task=trec", "data.max_train=48", "data.max_eval=16", "batch_size=4",
            "max_length=32", "progress=false", "lr=3e-3", "budget=none", *extra]


def train(*args):
    return main(["train", *map(str, args)])


def log(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def weights(run, step):
    return load_file(run / "checkpoints" / f"step-{step}" / "weights.safetensors")


def assert_same_run(straight, resumed, steps):
    """Every step once, with the straight run's loss and plan; the same final weights."""
    a, b = log(straight), log(resumed)
    assert [r["step"] for r in b] == list(range(steps))
    assert [r["loss"] for r in b] == [r["loss"] for r in a]
    assert [r["update"] for r in b] == [r["update"] for r in a]
    assert [r.get("method_log") for r in b] == [r.get("method_log") for r in a]
    wa, wb = weights(straight, steps), weights(resumed, steps)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module", autouse=True)
def no_plots():
    """The plots are not under test here, and drawing them takes as long as these tiny runs."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("dynatune.loop.plot_run", lambda run_dir: [])
        yield


@pytest.fixture(scope="module")
def straight(tiny_bert_dir, tmp_path_factory):
    """The straight run of each method's case, trained once per module."""
    runs = {}

    def get(name, *args):
        if name not in runs:
            runs[name] = tmp_path_factory.mktemp(f"straight-{name}")
            assert train(*common(tiny_bert_dir, *args), f"output_dir={runs[name]}", "save_model=false") == 0
        return runs[name]
    return get


# -- a checkpoint after every kind of step, resumed by `--resume RUN` alone --------------------------
TRIMS = ["method=trims", "trims.tau=3", f"max_steps={TOTAL}", f"checkpoint_every={TOTAL}"]
ADA = ["method=adagradselect", "epochs=2", f"checkpoint_every={2 * TOTAL}"]
FULL = ["method=full", "max_steps=8", "checkpoint_every=2"]


def stop_and_resume(args, run, at, monkeypatch):
    """Train to step `at` as if interrupted, then `dynatune train --resume RUN` alone from another
    directory: the run's config.json is the config, and the run writes into RUN."""
    assert train(*args, f"output_dir={run}", f"stop_after={at}", "save_model=false") == 0
    monkeypatch.chdir(run.parent)
    assert main(["train", "--resume", str(run)]) == 0
    assert not (run.parent / "runs").exists()  # no default output_dir was made
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["resumed_from_step"] == at
    return metrics


@pytest.mark.parametrize("at,decision", [(6, True), (7, False)], ids=["decision-step", "mid-period"])
def test_trims_resumes_after_a_decision_step_and_mid_period(at, decision, tiny_bert_dir, straight, tmp_path,
                                                           monkeypatch, one_thread):
    args = common(tiny_bert_dir, *TRIMS)
    a = straight("trims", *TRIMS)
    # tau = 3: step at-1 ends a period (its record holds the action) or it does not
    assert ("action" in log(a)[at - 1]["method_log"]) == decision
    assert {r["method_log"].get("action") for r in log(a)[at:]} - {None, "CON"}  # a later decision moves it
    metrics = stop_and_resume(args, tmp_path / "run", at, monkeypatch)
    assert_same_run(a, tmp_path / "run", TOTAL)
    ma = json.loads((a / "metrics.json").read_text())
    # the memory figures too: counted peak, and the prediction for the largest plan of the whole run
    assert metrics["test"] == ma["test"] and metrics["memory"] == ma["memory"]
    # budget=none stays none: train() records it as null, which alone would mean TriMS's default 60%
    assert json.loads((tmp_path / "run" / "config.json").read_text())["budget"] is None


@pytest.mark.parametrize("kind", ["explore", "exploit", "epoch-boundary"])
def test_adagradselect_resumes_after_exploration_exploitation_and_the_epoch_boundary(kind, tiny_bert_dir, straight,
                                                                                   tmp_path, monkeypatch, one_thread):
    args = common(tiny_bert_dir, *ADA)
    a = straight("adagradselect", *ADA)
    explored = [r["method_log"]["explore"] for r in log(a)]
    assert not any(explored[TOTAL:]) and explored[0] and not all(explored[:TOTAL])  # epoch 2 only exploits
    # the checkpoint comes right after a step of this kind
    at = {"explore": max(s for s in range(TOTAL - 1) if explored[s]) + 1,
          "exploit": explored.index(False) + 1, "epoch-boundary": TOTAL}[kind]
    assert explored[at - 1] == (kind == "explore")
    metrics = stop_and_resume(args, tmp_path / "run", at, monkeypatch)
    assert_same_run(a, tmp_path / "run", 2 * TOTAL)
    ma = json.loads((a / "metrics.json").read_text())
    assert metrics["evals"] == ma["evals"] and metrics["test"] == ma["test"] and metrics["memory"] == ma["memory"]


# -- what a resume may not change -----------------------------------------------------------------
@pytest.fixture(scope="module")
def stopped(tiny_bert_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("stopped")
    assert train(*common(tiny_bert_dir, *TRIMS), f"output_dir={run}", "stop_after=2", "save_model=false") == 0
    return run


@pytest.mark.parametrize("override,key,was,now", [
    ("seed=1", "seed", "0", "1"),
    ("trims.tau=5", "trims.tau", "3", "5"),
    ("batch_size=8", "batch_size", "4", "8"),
    ("max_steps=20", "max_steps", "12", "20"),
    ("method=full", "method", "trims", "full"),
    ("budget=0.6", "budget", "none", "0.6"),
    ("data.max_train=40", "data.max_train", "48", "40"),
])
def test_a_resume_that_would_change_training_is_one_sentence(override, key, was, now, tiny_bert_dir, stopped,
                                                             capsys):
    before = log(stopped)
    assert train("--resume", stopped, *common(tiny_bert_dir, *TRIMS), override) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dynatune: error:") and len(err.splitlines()) == 1
    assert f"{key} is {was} in the run but {now} here" in err
    assert log(stopped) == before  # nothing trained


def test_a_resume_writes_into_its_own_run(tiny_bert_dir, stopped, tmp_path, capsys):
    assert train("--resume", stopped, *common(tiny_bert_dir, *TRIMS), f"output_dir={tmp_path / 'other'}") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"output_dir={tmp_path / 'other'} is not the run being resumed" in err
    assert not (tmp_path / "other").exists()


def stopped_at_5(model_dir, tmp_path):
    """A full run stopped at step 5 of 8: checkpoints at steps 2 and 4, and at 5 where it stopped;
    keep_checkpoints=2 leaves 4 and 5."""
    run = tmp_path / "run"
    assert train(*common(model_dir, *FULL), f"output_dir={run}", "stop_after=5", "save_model=false") == 0
    return run


def test_resuming_an_earlier_checkpoint_rewinds_the_log(tiny_bert_dir, straight, tmp_path, caplog, one_thread):
    run = stopped_at_5(tiny_bert_dir, tmp_path)
    with (run / "log.jsonl").open("a") as f:
        f.write('{"step": 5, "lo')  # as a kill mid-write leaves it
    assert train("--resume", run / "checkpoints" / "step-4") == 0
    assert any("resuming at step 4" in r.getMessage() for r in caplog.records)
    assert_same_run(straight("full", *FULL), run, 8)  # steps 4 and 5 once, the cut record gone


# -- damaged checkpoints ----------------------------------------------------------------------------
def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "truncated-weights": lambda ckpt: truncate(ckpt / "weights.safetensors"),
    "truncated-state": lambda ckpt: truncate(ckpt / "state.pt"),
    "garbage-state": lambda ckpt: (ckpt / "state.pt").write_bytes(os.urandom(4096)),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(damage, tiny_bert_dir, straight, tmp_path,
                                                                  caplog, one_thread):
    run = stopped_at_5(tiny_bert_dir, tmp_path)
    DAMAGE[damage](run / "checkpoints" / "step-5")
    assert train("--resume", run) == 0
    warned = [r.getMessage() for r in caplog.records if "cannot be read" in r.getMessage()]
    assert len(warned) == 1 and "step-5" in warned[0] and len(warned[0].splitlines()) == 1
    assert any("resuming at step 4" in r.getMessage() for r in caplog.records)
    # steps 4 and 5, logged before the fall-back, are in the log once
    assert_same_run(straight("full", *FULL), run, 8)
    assert json.loads((run / "metrics.json").read_text())["resumed_from_step"] == 4


def test_no_intact_checkpoint_left_is_one_sentence(tiny_bert_dir, tmp_path, capsys):
    run = stopped_at_5(tiny_bert_dir, tmp_path)
    truncate(run / "checkpoints" / "step-5" / "weights.safetensors")
    (run / "checkpoints" / "step-4" / "state.pt").write_bytes(b"not a checkpoint")
    assert train("--resume", run) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dynatune: error: no intact checkpoint") and len(err.splitlines()) == 1
    assert "step-5" in err and "step-4" in err


# -- a run killed with SIGKILL ----------------------------------------------------------------------
KILLED = {
    "full": ["method=full"],
    "lisa": ["method=lisa", "lisa.k=1", "lisa.period=2"],
    "trims": ["method=trims", "trims.tau=3"],
    "adagradselect": ["method=adagradselect"],
}
CODE = "import sys; from dynatune.cli import main; sys.exit(main(sys.argv[1:]))"


def killed_args(model_dir, method):
    return common(model_dir, *KILLED[method], "max_steps=8", "checkpoint_every=2", "save_model=false")


@pytest.mark.parametrize("method", sorted(KILLED))
def test_a_run_killed_mid_run_resumes_to_the_straight_runs_weights(method, tiny_bert_dir, tmp_path, one_thread):
    args, killed, err = killed_args(tiny_bert_dir, method), tmp_path / "killed", tmp_path / "killed.err"
    proc = subprocess.Popen([sys.executable, "-c", CODE, "train", *args, f"output_dir={killed}"],
                            stdout=subprocess.DEVNULL, stderr=err.open("w"),
                            env={**os.environ, "OMP_NUM_THREADS": "1"})  # one thread, as the straight run here
    try:
        deadline = time.monotonic() + 180
        while not (killed / "checkpoints" / "latest").is_file():  # killed as soon as step-2 is written
            assert proc.poll() is None, "it ended before its first checkpoint: " + err.read_text()[-2000:]
            assert time.monotonic() < deadline, "no checkpoint after 180 s"
            time.sleep(0.005)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "metrics.json").exists()  # it died mid-run
    assert train("--resume", killed) == 0
    assert train(*args, f"output_dir={tmp_path / 'straight'}") == 0
    assert_same_run(tmp_path / "straight", killed, 8)
