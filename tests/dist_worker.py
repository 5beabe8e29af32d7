"""Runs for tests/test_distributed.py: the same jobs in one process or in each of N gloo processes.

    python tests/dist_worker.py JOBS.json OUT_DIR WORLD_SIZE

spawns WORLD_SIZE processes (torch.multiprocessing, a file store in OUT_DIR) that run every job
of JOBS.json and each write OUT_DIR/<tag>-rank<r>.pt: the per-step log records and the final
weights. `run_job(job)` is the same run in the calling process (no process group).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))

from tiny import causal_lm, classifier, cls_examples, collate, lm_examples, loop_cfg  # noqa: E402

from scripted import Scripted  # noqa: E402

from dynatune.config import run_budget  # noqa: E402
from dynatune.plan import Plan  # noqa: E402
from dynatune.loop import fit, seed_everything  # noqa: E402
from dynatune.methods import build_method  # noqa: E402

# the options each registered method runs with here (small k and periods: plans change within 4 steps)
OPTIONS = {"full": {}, "topk": {"k": 1}, "bottomk": {"k": 1}, "lisa": {"k": 1, "period": 1}, "random": {},
           "lora": {"r": 4}, "dora": {"r": 4}, "vera": {"r": 8}, "trims": {"tau": 1}, "gradselect": {},
           "adagradselect": {}, "dynalora": {"r": 4, "period": 2}, "dynavera": {"r": 8, "period": 2},
           "ist": {"r": 4, "t_c": 1, "dropout": 0.0}, "spsft": {"r": 4}}  # ist: no adapter dropout
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0)


class Logging(Scripted):
    """A scripted method that logs the signals it is handed."""

    def after_backward(self, step, signals):
        self._seen = {k: dict(v) for k, v in signals.items()}

    def log_fields(self, step):
        return {"signals": self._seen}


def run_job(job: dict) -> dict:
    """One run of the loop on a tiny BERT classifier; the job's keys: tag, method, options, and loop
    settings (batch_size is the global batch; grad_accum; max_steps; dropout; out_dir; resume...)."""
    if job.get("callback"):  # the Trainer callback's build, as at train begin
        from dynatune.integrations.hf import DynatuneCallback
        model = classifier("bert")
        DynatuneCallback(build_method("lisa"))._build(model, torch.optim.AdamW(model.parameters()), None)
        return {"history": []}
    seed_everything(0)
    if job.get("model") == "llama":  # a causal LM (no dropout in tiny llama)
        model = causal_lm("llama")
    else:
        model = classifier("bert", **({} if job.get("dropout") else NO_DROPOUT))
    seed = torch.distributed.get_rank() if job.get("rank_seed") else 0  # rank_seed: ranks would disagree
    if "scripted" in job:  # plans given by the test (exits, probes), every signal it names logged
        method = Logging([Plan.of(p.get("update", ()), p.get("probe", ()), p.get("probe_params", ()),
                                  p.get("exit_depth")) for p in job["scripted"]], signals=job.get("signals", ()))
    else:
        method = build_method(job["method"], seed=seed, **job.get("options", OPTIONS.get(job["method"], {})))
    keys = ("batch_size", "grad_accum", "max_steps", "checkpoint_every", "stop_after", "resume", "lr", "strategy")
    # the method's own budget unless the job names one; "no_budget" runs without (a one-process
    # reference for FSDP2, whose per-rank price admits other plans)
    budget = None if job.get("no_budget") else job.get("budget", run_budget(None, method))
    cfg = loop_cfg(max_length=12, margin=0.03, budget=budget,
                   **{k: job[k] for k in keys if k in job})
    data = (lm_examples if job.get("model") == "llama" else cls_examples)(n=job.get("examples", 16))
    out = Path(job["out_dir"]) if job.get("out_dir") else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    buckets = []  # (plan, the flat gradient buckets the step's reduction made)
    if job.get("bucket_bytes"):
        import dynatune.distributed as D
        D.BUCKET_BYTES = job["bucket_bytes"]

    def on_step(tuner, state):
        if tuner.sync is not None:
            buckets.append((tuner.plan, list(tuner.sync.flat_buckets)))
    tuner, state = fit(model, method, data, collate, cfg, out_dir=out, on_step=on_step)
    tuner.close_hooks()
    if job.get("bucket_bytes"):
        from dynatune.memory import MemoryModel
        mm = MemoryModel.from_tuner(tuner, batch_shape=(2, 12), world_size=tuner.sync.world, strategy="ddp",
                                    bucket_bytes=job["bucket_bytes"])
        return {"buckets": [(max(b, default=0), mm.communication_bytes(plan)[1]) for plan, b in buckets]}
    if job.get("shard_bytes"):  # one rank's sharded terms counted from live storage, and their price
        return shard_bytes(tuner, collate(data[:2]))
    keep = ("step", "loss", "update", "exit_depth", "promoted", "memory", "method_log")
    return {"history": [{k: h.get(k) for k in keep} for h in tuner.history],
            "weights": {n: full(p) for n, p in tuner.params.items()}}


def shard_bytes(tuner, batch) -> dict:
    """After one more backward under the last plan (its gradients reduce-scattered into shards): the
    storage bytes this rank holds of weights, gradients and optimizer state, and the memory model's
    price of those terms for one rank of 2 under fsdp."""
    from dynatune.distributed import local_part
    from dynatune.memory import MemoryModel
    from dynatune.memory.counting import optimizer_state_tensors, unique_bytes

    tuner.model(**batch).loss.backward()
    params = list(tuner.params.values())
    counted = {"weights": unique_bytes(local_part(p) for p in params),
               "gradients": unique_bytes(local_part(p.grad) for p in params if p.grad is not None),
               "optimizer": unique_bytes(local_part(t) for t in optimizer_state_tensors(tuner.optimizer))}
    mm = MemoryModel.from_tuner(tuner, batch_shape=tuple(batch["input_ids"].shape), world_size=2, strategy="fsdp")
    pred = mm.predict(tuner.plan)
    return {"counted": counted, "predicted": {k: getattr(pred, k) for k in counted}}


def full(p):
    """A parameter's whole value (an FSDP2 shard is gathered: every rank calls this, in the same order)."""
    from torch.distributed.tensor import DTensor
    return p.detach().full_tensor().clone() if isinstance(p, DTensor) else p.detach().clone()


def _rank_main(rank: int, world: int, jobs: list[dict], out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        for job in jobs:
            try:
                result = run_job(job)
            except Exception as err:  # noqa: BLE001 - reported to the test, which fails with it
                result = {"error": f"{type(err).__name__}: {err}"}
            torch.save(result, Path(out) / f"{job['tag']}-rank{rank}.pt")
            dist.barrier()
    finally:
        dist.destroy_process_group()


def main(argv):
    jobs = json.loads(Path(argv[0]).read_text())
    out, world = argv[1], int(argv[2])
    torch.multiprocessing.spawn(_rank_main, args=(world, jobs, out), nprocs=world, join=True)


if __name__ == "__main__":
    main(sys.argv[1:])
