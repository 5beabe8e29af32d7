"""Data parallelism on the CPU: 2 gloo processes (tests/dist_worker.py), every registered method.

Tolerance: a 2-process run sums each gradient over ranks (bucketed, flattened) where one process
with grad_accum=2 accumulates the same two micro-batches in place, so gradients agree to the last
bits only. Losses are compared to 1e-6 and weights to 1e-5: AdamW divides by sqrt(v), so a gradient
entry near zero whose last bits differ can move its weight by lr x its relative difference (seen:
1.1e-6 on one LayerNorm weight at lr=1e-3; most weights agree to ~1e-8). Plans, which decisions
read from agreed signals, must be identical, and the two ranks' weights bit-identical.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dynatune.distributed import Replicas
from dynatune.errors import DynatuneError
from dynatune.methods import METHODS, build_method
from dynatune.plan import Plan
from dynatune.signals import SIGNALS

sys.path.insert(0, os.path.dirname(__file__))
from dist_worker import NO_DROPOUT, OPTIONS, run_job  # noqa: E402

HERE = Path(__file__).parent
SRC = HERE.parent / "src"
LOSS_TOL, WEIGHT_TOL = 1e-6, 1e-5
STEPS = 4
# 16 examples, global batch 4 (2 per rank): 4 steps within one epoch
BASE = {"batch_size": 4, "max_steps": STEPS}
# plans that change within 4 steps: a test that compares them compares something
CHANGING = {"lisa", "random", "adagradselect", "dynalora", "dynavera", "ist"}


def run_ranks(cmd: list[str], env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    """`cmd` (a launcher and its ranks) run to a successful end, else the test fails with its stderr.
    One that outlives `timeout` is a hang (ranks waiting on collectives that do not match): every
    process under it dumps its threads' Python stacks (faulthandler, on SIGABRT) and the test fails
    with them, so a hang in CI says where."""
    import signal

    import psutil

    proc = subprocess.Popen(cmd, env={**env, "PYTHONFAULTHANDLER": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        ranks = psutil.Process(proc.pid).children(recursive=True)
        for r in ranks:
            r.send_signal(signal.SIGABRT)
        psutil.wait_procs(ranks, timeout=30)
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(cmd[:6])} ... ran past {timeout} s; its processes' stacks:\n{err[-12000:]}")
    assert proc.returncode == 0, err[-3000:]
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_a_launch_that_hangs_fails_with_the_stacks_of_its_processes(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text("import time\n\ndef wait_for_peers():\n    time.sleep(120)\n\nwait_for_peers()\n")
    launcher = [sys.executable, "-c", f"import subprocess, sys; subprocess.run([sys.executable, {str(script)!r}])"]
    with pytest.raises(pytest.fail.Exception, match=r"ran past 2 s(.|\n)*line 4 in wait_for_peers"):
        run_ranks(launcher, dict(os.environ), timeout=2)


def spawn(jobs: list[dict], out: Path, world: int = 2, timeout: int = 900) -> dict:
    """Run `jobs` in `world` gloo processes; {tag: [rank 0's result, rank 1's, ...]}."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "jobs.json").write_text(json.dumps(jobs))
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    run_ranks([sys.executable, str(HERE / "dist_worker.py"), str(out / "jobs.json"), str(out), str(world)], env,
              timeout)
    return {j["tag"]: [torch.load(out / f"{j['tag']}-rank{r}.pt") for r in range(world)] for j in jobs}


def plans(result):
    return [(h["update"], h["exit_depth"], h["promoted"]) for h in result["history"]]


def assert_close_runs(a, b):
    assert plans(a) == plans(b)
    for x, y in zip(a["history"], b["history"]):
        assert x["loss"] == pytest.approx(y["loss"], abs=LOSS_TOL)
    for n, w in a["weights"].items():
        assert torch.allclose(w, b["weights"][n], atol=WEIGHT_TOL, rtol=0), n


SCRIPT = [{"update": ["block.3", "norm"]},
          {"update": ["block.1", "norm"], "exit_depth": 2},  # blocks 2 and 3 exited: they neither run nor reduce
          {"update": ["block.2", "norm"], "probe": ["block.0"]},  # backward reaches block 0's output
          {"update": ["block.0", "block.3", "norm"], "probe_params": ["block.1"]}]  # block 1's gradient read, not applied
# LISA with one block a step over 8 steps: blocks leave and come back (their state from the host)
OFFLOAD = {"method": "lisa", "options": {"k": 1, "period": 1, "state_policy": "offload"}, **BASE, "max_steps": 8}
VARIANTS = {"dynalora-backward": ("dynalora", {"r": 4, "period": 2, "importance": "backward"}),  # reduced grads
            "trims-measured": ("trims", {"tau": 1, "time": "measured"})}  # rank 0's clock


@pytest.fixture(scope="module")
def every_method(tmp_path_factory):
    """Every registered method, 4 steps in 2 processes (one spawn for all of them)."""
    assert sorted(OPTIONS) == sorted(METHODS), "add the new method to tests/dist_worker.py's OPTIONS"
    jobs = [{"tag": m, "method": m, **BASE} for m in sorted(METHODS)]
    # rank-dependent seeds: ranks would draw different plans
    jobs.append({"tag": "skewed", "method": "random", "rank_seed": True, **BASE})
    out = tmp_path_factory.mktemp("dist")
    # FSDP2 (fully_shard per block) for every method (gradselect and adagradselect: the ranking read
    # from the shards after backward, their state offloaded shard by shard)
    # (without a budget: one rank's sharded price admits other plans than one process's; budgets below)
    jobs += [{"tag": f"fsdp-{m}", "method": m, "strategy": "fsdp", "no_budget": True, **BASE} for m in sorted(METHODS)]
    jobs.append({"tag": "fsdp-offload", **OFFLOAD, "strategy": "fsdp", "no_budget": True})
    # a signal read in backward hooks, which never fire on FSDP2's shards: refused
    jobs.append({"tag": "fsdp-grad-signal", "scripted": SCRIPT, "model": "llama", "strategy": "fsdp",
                 "signals": ["grad_norm"], **BASE})
    # exits, probes and every signal, on a causal LM: under DDP, and (activation signals) under FSDP2
    jobs += [{"tag": "scripted-ddp", "scripted": SCRIPT, "model": "llama", "signals": list(SIGNALS), **BASE},
             {"tag": "scripted-fsdp", "scripted": SCRIPT, "model": "llama", "strategy": "fsdp",
              "signals": ["act_grad_norm", "act_norm"], **BASE}]
    jobs.append({"tag": "callback", "callback": True})
    # option variants whose decisions read other rank-local inputs
    jobs += [{"tag": tag, "method": m, "options": o, **BASE} for tag, (m, o) in VARIANTS.items()]
    # a budget under FSDP2: every plan priced for one rank's shards
    jobs += [{"tag": f"budget-{s}", "method": "trims", "options": {"tau": 1}, "strategy": s, "max_steps": 6,
              "budget": "0.6", "batch_size": 4} for s in ("ddp", "fsdp")]
    jobs.append({"tag": "budget-fsdp-too-small", "method": "trims", "strategy": "fsdp", "budget": "1000B", **BASE})
    m, o = VARIANTS["dynalora-backward"]  # gradients read from FSDP2's shards
    jobs.append({"tag": "fsdp-dynalora-backward", "method": m, "options": o, "strategy": "fsdp", **BASE})
    # one rank's sharded weights, gradients and optimizer state, counted against their price
    jobs += [{"tag": f"shards-{m}", "method": m, "strategy": "fsdp", "no_budget": True, "shard_bytes": True, **BASE}
             for m in ("full", "topk", "lora")]
    # small buckets, so the reduction makes several: the memory model prices the largest
    jobs += [{"tag": f"buckets-{m}", "method": m, "bucket_bytes": 20_000, **BASE} for m in ("lisa", "dynalora")]
    jobs.append({"tag": "written", "method": "lisa", "out_dir": str(out / "run"), "checkpoint_every": 2, **BASE})
    return spawn(jobs, out), out


@pytest.mark.parametrize("method", sorted(OPTIONS))
def test_plans_agree_on_both_ranks_and_equal_one_process_with_the_same_global_batch(method, every_method):
    results, _ = every_method
    r0, r1 = results[method]
    assert "error" not in r0 and "error" not in r1, (r0.get("error"), r1.get("error"))
    assert len(r0["history"]) == len(r1["history"]) == STEPS
    assert plans(r0) == plans(r1)  # the same plan on every rank at every step
    assert [h["loss"] for h in r0["history"]] == [h["loss"] for h in r1["history"]]  # the global loss, agreed
    for n, w in r0["weights"].items():  # replicas stay bit-identical
        assert torch.equal(w, r1["weights"][n]), n
    if method in CHANGING:
        assert len({str(p) for p in plans(r0)}) > 1, "the plan never changed: the comparison would be vacuous"
    # one process, the same global batch of 4 as two micro-batches of 2: the same examples per micro-batch
    single = run_job({"tag": method, "method": method, **BASE, "grad_accum": 2})
    assert_close_runs(r0, single)


def _fsdp_ready(m) -> bool:
    method = build_method(m, **OPTIONS[m])
    in_hooks = method.reads_gradients_in_backward and not method.reads_sharded_gradients_after_backward
    return not (in_hooks or {"grad_norm", "taylor"} & set(method.signals))


@pytest.mark.parametrize("tag", sorted(VARIANTS))
def test_variants_reading_gradients_after_backward_or_a_clock_agree_too(tag, every_method):
    results, _ = every_method
    r0, r1 = results[tag]
    assert "error" not in r0 and "error" not in r1, (r0.get("error"), r1.get("error"))
    assert plans(r0) == plans(r1)
    assert [h["method_log"] for h in r0["history"]] == [h["method_log"] for h in r1["history"]]
    if tag == "dynalora-backward":  # its scores are the summed gradients' norms: one process's
        method, options = VARIANTS[tag]
        assert_close_runs(r0, run_job({"tag": tag, "method": method, "options": options, **BASE, "grad_accum": 2}))


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_exits_probes_and_every_signal_agree_and_equal_one_process(strategy, every_method):
    results, _ = every_method
    r0, r1 = results[f"scripted-{strategy}"]
    assert "error" not in r0 and "error" not in r1, (r0.get("error"), r1.get("error"))
    assert [h["method_log"] for h in r0["history"]] == [h["method_log"] for h in r1["history"]]  # the same bits
    job = {"tag": "x", "scripted": SCRIPT, "model": "llama", **BASE, "grad_accum": 2}
    single = run_job({**job, "signals": list(SIGNALS) if strategy == "ddp" else ["act_grad_norm", "act_norm"]})
    assert_close_runs(r0, single)
    assert [h["exit_depth"] for h in r0["history"]] == [None, 2, None, None]
    for got, want in zip(r0["history"], single["history"]):
        sig, ref = got["method_log"]["signals"], want["method_log"]["signals"]
        assert {k: sorted(v) for k, v in sig.items()} == {k: sorted(v) for k, v in ref.items()}
        for name in sig:
            for unit, value in sig[name].items():
                assert value == pytest.approx(ref[name][unit], rel=1e-5), (name, unit)
    if strategy == "ddp":  # block 1's parameters were probed at step 3: their (summed) gradient was read
        assert "block.1" in r0["history"][3]["method_log"]["signals"]["grad_norm"]


FSDP_METHODS = sorted(m for m in METHODS if _fsdp_ready(m))


def test_fsdp_covers_every_method():
    assert set(FSDP_METHODS) == set(METHODS)


def test_a_budget_under_fsdp2_holds_every_plan_to_one_ranks_sharded_price(every_method):
    """A fraction under FSDP2 is of full fine-tuning's price for one rank (its shards, the gathered
    block, the unsharded gradient), and TriMS keeps every plan's prediction within it, on both
    ranks alike. Under FSDP2 the budget is held against the prediction: the counter reads whole tensors."""
    from dynatune.engine import Tuner
    from dynatune.memory import MemoryModel, full_finetuning_peak, usable_budget
    from tiny import classifier

    results, _ = every_method
    fsdp, ddp = results["budget-fsdp"], results["budget-ddp"]
    for r in (*fsdp, *ddp):
        assert "error" not in r, r.get("error")
    assert [h["method_log"] for h in fsdp[0]["history"]] == [h["method_log"] for h in fsdp[1]["history"]]
    tuner = Tuner(classifier("bert", **NO_DROPOUT), build_method("trims", tau=1))
    mms = {s: MemoryModel.from_tuner(tuner, batch_shape=(2, 12), world_size=2, strategy=s) for s in ("ddp", "fsdp")}
    for s, runs in (("fsdp", fsdp), ("ddp", ddp)):
        logs = [h["method_log"] for h in runs[0]["history"]]
        assert logs[0]["budget_bytes"] == int(0.6 * full_finetuning_peak(mms[s]))
        for log, h in zip(logs, runs[0]["history"]):
            assert log["predicted_peak_bytes"] == mms[s].predict(Plan.of(h["update"])).predicted_peak_bytes
            assert log["predicted_peak_bytes"] <= usable_budget(log["budget_bytes"], 0.03)
    assert fsdp[0]["history"][0]["method_log"]["budget_bytes"] < ddp[0]["history"][0]["method_log"]["budget_bytes"]
    assert fsdp[0]["history"][0]["memory"] is None  # not counted under FSDP2
    for r in results["budget-fsdp-too-small"]:  # below any plan: one sentence naming the minimum, before a step
        assert r["error"].startswith("BudgetError: the budget of 1000 bytes") and "must be at least" in r["error"]


def test_fsdp2_reads_an_adapter_gradient_norm_whole_from_the_shards(every_method):
    """dynalora's backward importance under FSDP2: each rank holds a shard of each gradient; the
    shards' squares are summed over ranks, so the plans equal one process's."""
    results, _ = every_method
    r0, r1 = results["fsdp-dynalora-backward"]
    assert "error" not in r0 and "error" not in r1, (r0.get("error"), r1.get("error"))
    assert [h["method_log"] for h in r0["history"]] == [h["method_log"] for h in r1["history"]]
    assert len({tuple(h["method_log"]["active"]) for h in r0["history"]}) > 1  # reallocated from the gradients
    m, o = VARIANTS["dynalora-backward"]
    one = run_job({"tag": "one", "method": m, "options": o, **BASE, "grad_accum": 2, "no_budget": True})
    assert plans(r0) == plans(one)
    assert_close_runs(r0, one)


@pytest.mark.parametrize("method", FSDP_METHODS)
def test_fsdp2_on_cpu_plans_agree_and_equal_one_process(method, every_method):
    results, _ = every_method
    r0, r1 = results[f"fsdp-{method}"]
    assert "error" not in r0 and "error" not in r1, (r0.get("error"), r1.get("error"))
    assert plans(r0) == plans(r1)
    assert [h["loss"] for h in r0["history"]] == [h["loss"] for h in r1["history"]]
    for n, w in r0["weights"].items():  # the gathered shards: the same whole weights on both ranks
        assert torch.equal(w, r1["weights"][n]), n
    if method in CHANGING:  # frozen and trainable parameters of one FSDP unit trade places between steps
        assert len({str(p) for p in plans(r0)}) > 1
    assert_close_runs(r0, run_job({"tag": method, "method": method, **BASE, "grad_accum": 2, "no_budget": True}))


def test_fsdp2_refuses_a_signal_read_in_backward_hooks_in_one_sentence(every_method):
    results, _ = every_method
    for r in results["fsdp-grad-signal"]:
        assert r["error"].startswith("DynatuneError: strategy=fsdp") and "use strategy=ddp" in r["error"]


def test_fsdp2_offloads_each_ranks_shard_of_the_state_and_restores_it(every_method):
    """state_policy=offload under FSDP2: a block that leaves takes its rank's shard of the state to the
    host, and gets it back as a shard when drawn again; the run equals one process offloading whole."""
    results, _ = every_method
    r0, r1 = results["fsdp-offload"]
    assert "error" not in r0 and "error" not in r1, (r0.get("error"), r1.get("error"))
    assert plans(r0) == plans(r1)
    updated = [tuple(u for u in h["update"] if u.startswith("block.")) for h in r0["history"]]
    assert any(b in updated[:i] and b != updated[i - 1] for i, b in enumerate(updated)), \
        "no block returned after leaving: nothing was restored from the host"
    one = run_job({"tag": "one", **OFFLOAD, "grad_accum": 2, "no_budget": True})
    assert_close_runs(r0, one)


def test_ranks_that_would_disagree_stop_with_one_error_not_a_hang(every_method):
    results, _ = every_method
    for r in results["skewed"]:
        assert "ranks disagree on the plan of step 0" in r["error"]


def test_a_stock_trainer_with_the_callback_is_refused_under_several_processes_in_one_sentence(every_method):
    results, _ = every_method
    for r in results["callback"]:
        assert r["error"].startswith("DynatuneError: under several processes a stock Trainer wraps the model in DDP")
        assert "use dynatune.integrations.hf.DynatuneTrainer" in r["error"]


def test_only_rank_0_writes_the_run_directory(every_method):
    results, out = every_method
    run = out / "run"
    lines = (run / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(STEPS))  # once each: one writer
    assert [json.loads(line)["loss"] for line in lines] == [h["loss"] for h in results["written"][0]["history"]]
    assert sorted(d.name for d in (run / "checkpoints").iterdir()) == ["latest", "step-2", "step-4"]
    state = torch.load(run / "checkpoints" / "step-4" / "state.pt", weights_only=False)
    assert len(state["rng_ranks"]) == 2  # each rank's RNG, written by rank 0
    assert not list(run.rglob("*.tmp"))


def test_resume_of_a_two_process_run_equals_the_straight_run_and_resumes_on_one_process(tmp_path):
    # dropout on: each rank's dropout stream must resume where it was
    jobs = []
    resumed_methods = ("adagradselect", "lisa", "dynalora")  # dynalora: eq. 1's sums are each rank's own
    for m in resumed_methods:
        common = {"method": m, "dropout": True, "checkpoint_every": 2, **BASE}
        jobs += [{"tag": f"{m}-straight", "out_dir": str(tmp_path / m / "straight"), **common},
                 {"tag": f"{m}-first", "out_dir": str(tmp_path / m / "cut"), "stop_after": 2, **common},
                 {"tag": f"{m}-resumed", "out_dir": str(tmp_path / m / "cut"), "resume": str(tmp_path / m / "cut"),
                  **common}]
    # dropout off, cut after 2 steps: resumed in one process below
    nodrop = {"method": "lisa", "checkpoint_every": 2, **BASE}
    jobs += [{"tag": "nodrop-straight", **nodrop},
             {"tag": "nodrop-cut", "out_dir": str(tmp_path / "nodrop"), "stop_after": 2, **nodrop}]
    results = spawn(jobs, tmp_path / "spawn")
    # a DDP checkpoint resumes on another number of ranks: 1 process, the same global batch
    other_n = run_job({"tag": "x", **nodrop, "grad_accum": 2, "out_dir": str(tmp_path / "nodrop"),
                       "resume": str(tmp_path / "nodrop")})
    assert_close_runs(other_n, results["nodrop-straight"][0])
    for m in resumed_methods:
        for rank in (0, 1):
            straight, resumed = results[f"{m}-straight"][rank], results[f"{m}-resumed"][rank]
            assert "error" not in resumed, resumed.get("error")
            assert plans(resumed) == plans(straight)
            assert [h["method_log"] for h in resumed["history"]] == [h["method_log"] for h in straight["history"]]
            assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in straight["history"]]
            for n, w in straight["weights"].items():
                assert torch.equal(w, resumed["weights"][n]), n


def fake_replicas(rank, world):
    r = object.__new__(Replicas)
    r.rank, r.world, r.is_main = rank, world, rank == 0
    return r


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("n", [1, 4, 7, 12])
def test_each_global_batch_is_cut_into_contiguous_shares_in_the_plain_loop_order(world, n):
    idx = [5 * i + 3 for i in range(n)]
    shares = [fake_replicas(r, world).shard(idx) for r in range(world)]
    assert sum(shares, []) == idx  # every example once, in order
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_a_batch_the_ranks_cannot_share_evenly_is_refused_before_training():
    r = fake_replicas(0, 2)
    r.check_batches(8, 2, 40)
    with pytest.raises(DynatuneError, match="batch_size=6 must be a multiple of world_size x grad_accum = 2 x 2"):
        r.check_batches(6, 2, 40)
    with pytest.raises(DynatuneError, match="the last batch of each epoch has 5 examples"):
        r.check_batches(8, 1, 45)


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CLI_ARGS = ["task=trec", "data.max_train=16", "data.max_eval=8", "batch_size=4", "max_length=32", "max_steps=2",
            "method=lisa", "lisa.k=1", "lisa.period=1", "progress=false", "device=cpu"]
LAUNCHERS = {
    "torchrun": lambda: [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                         f"--master_port={free_port()}"],
    # on a CPU-only machine --multi_gpu is what starts local processes (torch.distributed.run); --cpu runs one
    "accelerate": lambda: [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes=2",
                           "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no",
                           f"--main_process_port={free_port()}"],
}


def test_dynatune_train_under_torchrun_and_accelerate_launch_writes_one_run_equal_to_one_process(tiny_bert_dir, tmp_path):
    from dynatune.cli import main

    import shutil

    model = tmp_path / "model"  # dropout off: one process would draw other masks for its second micro-batch
    shutil.copytree(tiny_bert_dir, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "hidden_dropout_prob": 0.0,
                                                   "attention_probs_dropout_prob": 0.0}))
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    logs = {}
    for name, launcher in LAUNCHERS.items():
        out = tmp_path / name
        proc = run_ranks([*launcher(), "-m", "dynatune.cli", "train", f"model={model}", *CLI_ARGS,
                          f"output_dir={out}"], env, timeout=300)
        assert proc.stdout.count("run written to") == 1  # rank 0 reports, once
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["steps"] == 2 and metrics["validation"] is not None
        json.loads((out / "config.json").read_text())
        logs[name] = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        assert [e["step"] for e in logs[name]] == [0, 1]
    assert logs["torchrun"] == [{**e, "step_time_s": t["step_time_s"]} for e, t in zip(logs["accelerate"], logs["torchrun"])]
    one = tmp_path / "one"
    assert main(["train", f"model={model}", *CLI_ARGS, "grad_accum=2", f"output_dir={one}"]) == 0
    single = [json.loads(line) for line in (one / "log.jsonl").read_text().splitlines()]
    assert [e["update"] for e in single] == [e["update"] for e in logs["torchrun"]]
    assert [e["loss"] for e in single] == pytest.approx([e["loss"] for e in logs["torchrun"]], abs=LOSS_TOL)


@pytest.mark.parametrize("method", ["lisa", "dynalora"])
def test_the_memory_model_prices_the_largest_gradient_bucket_a_rank_allocates(method, every_method):
    results, _ = every_method
    for rank in (0, 1):
        pairs = results[f"buckets-{method}"][rank]["buckets"]
        assert len(pairs) == STEPS
        assert all(counted == predicted for counted, predicted in pairs), pairs
    assert any(counted > 0 for counted, _ in pairs)


@pytest.mark.parametrize("method", ["full", "topk", "lora"])
def test_a_ranks_counted_fsdp2_shards_equal_the_memory_models_price_to_the_byte(method, every_method):
    """Weights, gradients (reduce-scattered) and AdamW state under FSDP2, counted from each rank's live
    storage: rank 0, which holds the largest (padded) shard, equals the per-rank price exactly; rank 1
    holds the same padded weight and gradient shards and at most that much state (AdamW's state is
    made like the unpadded local shard)."""
    results, _ = every_method
    r0, r1 = results[f"shards-{method}"]
    assert "error" not in r0 and "error" not in r1, (r0.get("error"), r1.get("error"))
    assert r0["counted"] == r0["predicted"]
    assert r1["counted"]["weights"] == r1["predicted"]["weights"]
    assert r1["counted"]["gradients"] == r1["predicted"]["gradients"]
    assert r1["counted"]["optimizer"] <= r1["predicted"]["optimizer"]
    assert 0 < r0["counted"]["gradients"] and 0 < r0["counted"]["optimizer"]


def test_a_rank_of_ddp_holds_everything_and_of_fsdp_a_padded_shard():
    from dynatune.memory import MemoryModel
    from dynatune.plan import Plan
    from tiny import classifier

    model = classifier("bert")
    mms = {(w, s): MemoryModel(model, batch_shape=(2, 12), world_size=w, strategy=s, device_type="cuda")
           for w, s in [(1, "ddp"), (2, "ddp"), (3, "fsdp"), (1, "fsdp")]}
    plan = Plan.of(u.name for u in mms[1, "ddp"].units)
    p = {k: mm.predict(plan) for k, mm in mms.items()}
    one = p[1, "ddp"]
    assert p[1, "fsdp"].to_dict() == one.to_dict()  # one rank: nothing to shard or reduce
    for k in ("weights", "gradients", "optimizer", "activations"):
        assert getattr(p[2, "ddp"], k) == getattr(one, k)  # replicated
    # 2 ranks: every gradient (one bucket, far below 25 MiB) flattened once at the end of backward
    assert mms[2, "ddp"].communication_bytes(plan) == (0, one.gradients)
    shard = sum(-(-q.shape[0] // 3) * (q.numel() // q.shape[0]) * 4 for q in model.parameters())
    assert p[3, "fsdp"].weights == p[3, "fsdp"].gradients == shard < one.weights / 2.9
    assert p[3, "fsdp"].optimizer == 2 * shard  # AdamW: two moments per (sharded) element
    blocks = [sum(q.numel() * 4 for q in blk.parameters()) for blk in model.bert.encoder.layer]
    assert mms[3, "fsdp"].communication_bytes(plan) == (3 * max(blocks), 0)


def test_estimate_prices_one_rank_of_a_data_parallel_run(capsys):
    from dynatune.planner import estimate

    common = ["model=arch:qwen2-0.5b", "batch_size=8", "seq_len=64", "families=full"]
    one = {r["config"]: r for r in estimate(common)}
    ddp = {r["config"]: r for r in estimate(common + ["world_size=2", "batch_size=16"])}
    fsdp = {r["config"]: r for r in estimate(common + ["world_size=2", "batch_size=16", "strategy=fsdp"])}
    assert one["full"]["counted_terms"] == ddp["full"]["counted_terms"]  # the same per-rank micro-batch
    assert ddp["full"]["predicted_peak_bytes"] >= one["full"]["predicted_peak_bytes"]
    assert fsdp["full"]["counted_terms"]["weights"] < 0.51 * one["full"]["counted_terms"]["weights"]
    with pytest.raises(DynatuneError, match="batch_size=8 is not divisible by grad_accum=1 x world_size=16"):
        estimate(common + ["world_size=16"])
    with pytest.raises(DynatuneError, match="strategy must be ddp or fsdp"):
        estimate(common + ["strategy=zero3"])


# -- DynatuneTrainer launched by torchrun / accelerate launch -----------------------------------------
# a changing block plan, signals read after backward, gradients read during backward (hooks) with
# offloaded state, adapters with forward importance, extra forwards, and a calibration phase
TRAINER_METHODS = ("lisa", "trims", "adagradselect", "dynalora", "ist", "spsft")
TRAINER_RESUMED = ("lisa", "adagradselect", "dynalora")  # dynalora: its rank-local sums are folded on save


@pytest.fixture(scope="module")
def trainer_runs(tmp_path_factory):
    """tests/trainer_worker.py: every TRAINER_METHODS run under torchrun (2 processes, 2 examples per
    device) and in one process with gradient_accumulation_steps=2 (the same 4 examples a step), and
    lisa under accelerate launch."""
    out = tmp_path_factory.mktemp("trainer")
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    worker = str(HERE / "trainer_worker.py")
    methods = ",".join(TRAINER_METHODS)
    for cmd in ([*LAUNCHERS["torchrun"](), worker, str(out / "two"), methods, "1", ",".join(TRAINER_RESUMED)],
                [*LAUNCHERS["accelerate"](), worker, str(out / "accelerate"), "lisa", "1"],
                [sys.executable, worker, str(out / "one"), methods, "2"]):
        run_ranks(cmd, env)
    return out


def _trainer_result(out, name, ranks=2):
    return [torch.load(out / f"{name}-rank{r}.pt") for r in range(ranks)]


@pytest.mark.parametrize("method", TRAINER_METHODS)
def test_dynatune_trainer_under_torchrun_agrees_on_both_ranks_and_equals_one_process(method, trainer_runs):
    """DDP's semantics without DDP's wrapper: the same plans and bit-identical weights on both ranks,
    the plans, the engine's and the Trainer's logged losses and the weights of one process that
    accumulates the same two micro-batches."""
    r0, r1 = _trainer_result(trainer_runs / "two", method)
    (one,) = _trainer_result(trainer_runs / "one", method, ranks=1)
    assert_two_ranks_equal_one_process(r0, r1, one)
    if method in CHANGING | {"adagradselect"}:
        assert len({tuple(p[0]) for p in plans_of(r0)}) > 1  # the trainable set changed within the run


def assert_two_ranks_equal_one_process(r0, r1, one):
    """Both ranks' Trainer runs: the same plans and bit-identical weights, and one process's plans,
    engine and Trainer losses and weights (to the stated tolerances)."""
    assert plans_of(r0) == plans_of(r1) == plans_of(one)
    assert all(torch.equal(w, r1["weights"][n]) for n, w in r0["weights"].items())
    assert [h["loss"] for h in r0["history"]] == pytest.approx([h["loss"] for h in one["history"]], abs=LOSS_TOL)
    assert r0["logged_losses"] == pytest.approx(one["logged_losses"], abs=LOSS_TOL)
    for n, w in r0["weights"].items():
        assert torch.allclose(w, one["weights"][n], atol=WEIGHT_TOL, rtol=0), n


def plans_of(result):
    return [h["update"] for h in result["history"]]


def test_dynatune_trainer_under_accelerate_launch_equals_torchrun(trainer_runs):
    a0, a1 = _trainer_result(trainer_runs / "accelerate", "lisa")
    t0, _ = _trainer_result(trainer_runs / "two", "lisa")
    assert plans_of(a0) == plans_of(a1) == plans_of(t0)
    assert all(torch.equal(w, t0["weights"][n]) for n, w in a0["weights"].items())


@pytest.mark.parametrize("method", TRAINER_RESUMED)
def test_dynatune_trainer_resume_of_two_processes_equals_the_straight_run(method, trainer_runs):
    straight, _ = _trainer_result(trainer_runs / "two", method)
    r0, r1 = [torch.load(trainer_runs / "two" / f"{method}-resumed-rank{r}.pt") for r in range(2)]
    assert plans_of(r0) == plans_of(r1) == plans_of(straight)
    assert [h["method_log"] for h in r0["history"]] == [h["method_log"] for h in straight["history"]]
    for n, w in straight["weights"].items():
        assert torch.equal(r0["weights"][n], w) and torch.equal(r1["weights"][n], w), n
    # one writer: rank 0 saved the engine's state beside the Trainer's checkpoint
    assert (trainer_runs / "two" / method / "checkpoint-2" / "dynatune_state.pt").is_file()


TRAINER_FSDP = ("lisa", "adagradselect", "dynalora")


@pytest.fixture(scope="module")
def trainer_fsdp_runs(trainer_runs):
    """DynatuneTrainer(strategy="fsdp") under torchrun: TRAINER_FSDP, lisa and adagradselect also
    resumed from checkpoint-2; compared with trainer_runs' one-process runs."""
    out = trainer_runs / "fsdp"
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    methods = ",".join([*TRAINER_FSDP, "lisa+best"])  # lisa+best: evaluated, the best checkpoint loaded at the end
    run_ranks([*LAUNCHERS["torchrun"](), str(HERE / "trainer_worker.py"), str(out), methods,
               "1", "lisa,adagradselect", "fsdp"], env)
    return out


@pytest.mark.parametrize("method", TRAINER_FSDP)
def test_dynatune_trainer_with_fsdp2_equals_one_process_resumes_and_saves_a_model_that_loads(method, trainer_runs,
                                                                                            trainer_fsdp_runs):
    """DynatuneTrainer(strategy="fsdp") shards with FSDP2 before the Trainer builds its optimizer: the
    same plans and gathered weights on both ranks, and those of one process accumulating the same two
    micro-batches; a resume from checkpoint-2 equals the straight run bit for bit; trainer.save_model
    writes the whole model, gathered (lisa and adagradselect load it with from_pretrained)."""
    from safetensors.torch import load_file

    r0, r1 = _trainer_result(trainer_fsdp_runs, method)
    (one,) = _trainer_result(trainer_runs / "one", method, ranks=1)
    assert r0["sharded"] and r1["sharded"]
    assert_two_ranks_equal_one_process(r0, r1, one)
    if method != "dynalora":
        assert len({tuple(p) for p in plans_of(r0)}) > 1
        resumed = [torch.load(trainer_fsdp_runs / f"{method}-resumed-rank{r}.pt") for r in range(2)]
        for r in resumed:
            assert plans_of(r) == plans_of(r0)
            assert all(torch.equal(r["weights"][n], w) for n, w in r0["weights"].items())
        assert not (trainer_fsdp_runs / method / "checkpoint-2" / "optimizer.pt").exists()  # whole, in the engine's
    final = trainer_fsdp_runs / method / "final"
    if method == "dynalora":  # adapters injected by prepare(): the Trainer saves the whole model, as under DDP
        saved = load_file(final / "model.safetensors")
        assert saved.keys() == r0["weights"].keys() and any("lora_" in k for k in saved)
        assert all(torch.equal(saved[n], w) for n, w in r0["weights"].items())
    else:
        from transformers import AutoModelForSequenceClassification
        loaded = dict(AutoModelForSequenceClassification.from_pretrained(final).named_parameters())
        assert loaded.keys() == r0["weights"].keys()
        assert all(torch.equal(loaded[n], w) for n, w in r0["weights"].items())


def test_dynatune_trainer_with_fsdp2_loads_the_best_checkpoint_at_the_end(trainer_runs, trainer_fsdp_runs):
    """load_best_model_at_end under DynatuneTrainer(strategy="fsdp"): evaluations every 2 steps leave
    training as one process trains (the gathered root after an evaluation takes each plan's flags),
    and at the end every rank holds its shard of the best checkpoint's weights."""
    from safetensors.torch import load_file

    r0, r1 = [torch.load(trainer_fsdp_runs / f"lisa+best-rank{r}.pt") for r in range(2)]
    (one,) = _trainer_result(trainer_runs / "one", "lisa", ranks=1)
    assert plans_of(r0) == plans_of(one)
    assert [h["loss"] for h in r0["history"]] == pytest.approx([h["loss"] for h in one["history"]], abs=LOSS_TOL)
    best = Path(r0["best_checkpoint"])
    assert best.name == "checkpoint-2"  # not the last step: loading it changes the weights
    kept = load_file(best / "model.safetensors")
    assert not all(torch.equal(kept[n], w) for n, w in one["weights"].items())
    for r in (r0, r1):
        assert all(torch.equal(kept[n], w) for n, w in r["weights"].items())


def _no_dropout_copy(tiny_bert_dir, dest):
    import shutil

    shutil.copytree(tiny_bert_dir, dest)  # dropout off: one process would draw other masks for its 2nd micro-batch
    config = json.loads((dest / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps({**config, "hidden_dropout_prob": 0.0,
                                                  "attention_probs_dropout_prob": 0.0}))
    return dest


def _saved_weights(run):
    from safetensors.torch import load_file

    out = {}
    for f in sorted((run / "model").glob("*.safetensors")):
        out.update(load_file(f))
    return out


# a block method, and an adapter method whose saved output is a peft adapter
FSDP_CLI = {"lisa": [], "dynalora": ["method=dynalora", "dynalora.r=4", "dynalora.period=1", "dynalora.fraction=0.5"],
            # the ranking read from the shards, each rank's shard of the state offloaded (and checkpointed whole)
            "adagradselect": ["method=adagradselect", "adagradselect.k=0.25"]}


@pytest.mark.parametrize("method", sorted(FSDP_CLI))
def test_dynatune_train_strategy_fsdp_equals_one_process_and_resumes_on_any_number_of_ranks(method, tiny_bert_dir,
                                                                                          tmp_path):
    """`dynatune train strategy=fsdp` under torchrun: FSDP2 shards every block; evaluation runs on every
    rank; checkpoints and the saved model hold the weights gathered whole, written by rank 0. The run
    equals one process with grad_accum=2 (plans, losses, evaluations, saved weights), and a run stopped
    at step 2 resumes to the straight run, on 2 ranks bit for bit and on one process to float order."""
    import shutil

    from dynatune.cli import main

    model = _no_dropout_copy(tiny_bert_dir, tmp_path / "model")
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    # evaluated every step, the best evaluation's weights kept (gathered whole) and loaded back at the end
    args = [f"model={model}", *CLI_ARGS, *FSDP_CLI[method], "max_steps=4", "checkpoint_every=2", "eval_steps=1",
            "load_best=true"]

    def torchrun(*extra):
        return run_ranks([*LAUNCHERS["torchrun"](), "-m", "dynatune.cli", "train", *extra], env, timeout=300)

    def log(run):
        return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]

    straight, stopped, one = tmp_path / "fsdp", tmp_path / "stopped", tmp_path / "one"
    assert torchrun(*args, "strategy=fsdp", f"output_dir={straight}").stdout.count("run written to") == 1
    assert main(["train", *args, "grad_accum=2", f"output_dir={one}"]) == 0
    fsdp_log, one_log = log(straight), log(one)
    assert [e["update"] for e in fsdp_log] == [e["update"] for e in one_log]
    assert len({tuple(e["update"]) for e in fsdp_log}) > 1  # the plan moved
    assert [e["loss"] for e in fsdp_log] == pytest.approx([e["loss"] for e in one_log], abs=LOSS_TOL)
    m_fsdp, m_one = (json.loads((r / "metrics.json").read_text()) for r in (straight, one))
    assert m_fsdp["validation"]["loss"] == pytest.approx(m_one["validation"]["loss"], abs=LOSS_TOL)
    w_fsdp, w_one = _saved_weights(straight), _saved_weights(one)
    assert w_fsdp and w_fsdp.keys() == w_one.keys()
    if method == "dynalora":  # the adapter, as peft saves it, not the base model
        assert (straight / "model" / "adapter_model.safetensors").is_file() and all("lora_" in n or "classifier" in n
                                                                                  for n in w_fsdp)
    for n, w in w_fsdp.items():
        assert torch.allclose(w, w_one[n], atol=WEIGHT_TOL, rtol=0), n
    best = json.loads((straight / "checkpoints" / "best" / "best.json").read_text())
    assert m_fsdp["validation"]["step"] == best["step"] == m_one["validation"]["step"]
    if method != "dynalora":  # the saved model is the best evaluation's weights
        from safetensors.torch import load_file
        kept = load_file(straight / "checkpoints" / "best" / "weights.safetensors")
        assert all(torch.equal(w, kept[n]) for n, w in w_fsdp.items() if n in kept) and w_fsdp.keys() & kept.keys()
    state = torch.load(straight / "checkpoints" / "step-4" / "state.pt", weights_only=False)
    assert len(state["rng_ranks"]) == 2 and not list(straight.rglob("*.tmp"))

    torchrun(*args, "strategy=fsdp", "stop_after=2", f"output_dir={stopped}")
    on_one = tmp_path / "stopped-on-one"
    shutil.copytree(stopped, on_one)
    torchrun("--resume", str(stopped))                          # FSDP2 again, on 2 ranks
    assert main(["train", "--resume", str(on_one)]) == 0        # the same checkpoint, one process
    resumed = log(stopped)
    assert [e["update"] for e in resumed] == [e["update"] for e in fsdp_log]
    assert [e["loss"] for e in resumed] == [e["loss"] for e in fsdp_log]
    # the method's own records too: DynaLoRA's eq. 1 sums, which each rank gathers from its share of
    # the batch, are folded into the checkpoint rank 0 writes
    assert [e.get("method_log") for e in resumed] == [e.get("method_log") for e in fsdp_log]
    assert all(torch.equal(w, w_fsdp[n]) for n, w in _saved_weights(stopped).items())
    assert [e["update"] for e in log(on_one)] == [e["update"] for e in fsdp_log]
    for a, b in zip(log(on_one), fsdp_log):
        assert a.get("method_log", {}).get("importance") == pytest.approx(b.get("method_log", {}).get("importance"),
                                                                          abs=2e-6)
    for n, w in _saved_weights(on_one).items():
        assert torch.allclose(w, w_fsdp[n], atol=WEIGHT_TOL, rtol=0), n


def test_a_process_group_dynatune_joins_is_torn_down_once_at_exit(tmp_path):
    """Left to the interpreter's finalization, gloo's threads can outlive it and abort a finished
    run; the teardown is registered once, however often a run or Trainer asks, and destroys the
    group while the interpreter is whole."""
    import atexit

    import torch.distributed as dist

    from dynatune import distributed

    before = atexit._ncallbacks()
    distributed.destroy_at_exit()
    distributed.destroy_at_exit()
    assert atexit._ncallbacks() - before <= 1
    assert distributed._destroy_registered
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    assert dist.is_initialized()
    distributed._destroy_if_initialized()
    assert not dist.is_initialized()
    distributed._destroy_if_initialized()  # nothing left to destroy: no error
