"""What keeping plans in agreement costs per step, against a plain DDP loop training the same parameters.

    python benchmarks/distributed_overhead.py            # MiniLM-L6, 2 gloo processes on the CPU
    python benchmarks/distributed_overhead.py --smoke    # a tiny BERT, a few steps (proves the script)

Two processes (torch.multiprocessing, gloo) each hold two copies of the model and take turns
(A B A B ..., --repeats turns of --steps steps after --warmup untimed steps each):
- dynatune: the engine with a data-parallel `Replicas` (distributed.py): the plan checked equal on
  both ranks, the plan's gradients summed in flat buckets after backward, the loss (and any
  signal) agreed, `train_step` as the plain loop runs it;
- ddp: torch's DistributedDataParallel over the parameters of the plan dynatune applied at the same
  step (replayed; requires_grad False elsewhere), rebuilt whenever that set changes (DDP fixes the
  parameters it reduces when it is built: what a plain loop has to do for a changing plan), AdamW,
  the same clipping, one loss read per step.
Every step sees the same fixed, seeded global batch of --batch x --seq tokens, each rank its half.
Per method: median step time of each runner (wall, and this process's CPU time), their ratio, how
many DDP rebuilds the replay needed and the collectives dynatune issued per step. Rank 0's clock.

Writes benchmarks/results/distributed_overhead_cpu.json (or _smoke) with harness.provenance().
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

METHODS = {"full": {}, "topk": {"k": 2}, "lisa": {"k": 2, "period": 2}}


def build_model(smoke: bool):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    torch.manual_seed(0)
    if smoke:
        cfg = AutoConfig.for_model("bert", hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                   num_attention_heads=4, vocab_size=97, max_position_embeddings=64, num_labels=6)
    else:
        from dynatune.assets import asset_path
        cfg = AutoConfig.from_pretrained(asset_path("minilm-l6"), num_labels=6)
    cfg.hidden_dropout_prob = cfg.attention_probs_dropout_prob = 0.0
    if smoke:
        return AutoModelForSequenceClassification.from_config(cfg)
    from dynatune.assets import asset_path
    return AutoModelForSequenceClassification.from_pretrained(asset_path("minilm-l6"), config=cfg)


def batch(step: int, rank: int, world: int, args, vocab: int) -> dict:
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(1, vocab, (args.batch, args.seq), generator=g)
    labels = torch.randint(0, 6, (args.batch,), generator=g)
    per = args.batch // world
    sl = slice(rank * per, (rank + 1) * per)
    return {"input_ids": ids[sl], "attention_mask": torch.ones_like(ids[sl]), "labels": labels[sl]}


def _rank_main(rank: int, world: int, args, store: str, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from dynatune.distributed import Replicas
    from dynatune.engine import Tuner
    from dynatune.loop import train_step
    from dynatune.methods import build_method
    from dynatune.plan_mechanics import grad_param_names

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(args.threads)
    base = build_model(args.smoke)
    vocab = base.config.vocab_size
    step_cfg = SimpleNamespace(grad_clip=1.0, precision="fp32", chunked_loss=0)
    results = {}
    for name, opts in METHODS.items():
        sync = Replicas()
        tuner = Tuner(copy.deepcopy(base), build_method(name, seed=0, **opts), lr=1e-4, count_memory=False, sync=sync)
        plain = copy.deepcopy(base)
        params = dict(plain.named_parameters())
        opt = torch.optim.AdamW(list(params.values()), lr=1e-4)
        ddp, trained, rebuilds, plans = None, None, 0, []
        times = {"dynatune": [], "ddp": []}
        cpu = {"dynatune": [], "ddp": []}
        collectives = []

        def dyn_step(s):
            before = sync.collectives
            b = batch(s, rank, world, args, vocab)
            loss = train_step(tuner, tuner.model, [b], step_cfg, tuner.device, n_global=args.batch)
            tuner.end_step(loss)
            plans.append(tuner.plan)
            collectives.append(sync.collectives - before)

        def ddp_step(s):
            nonlocal ddp, trained, rebuilds
            wanted = grad_param_names(tuner.units, plans[s])
            if wanted != trained:  # DDP reduces the set it was built with: a new set needs a new DDP
                for n, p in params.items():
                    p.requires_grad_(n in wanted)
                    p.grad = None
                ddp, trained = DDP(plain), wanted
                rebuilds += 1
            loss = ddp(**batch(s, rank, world, args, vocab)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in params.values() if p.grad is not None], 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss.item()

        runners = {"dynatune": dyn_step, "ddp": ddp_step}
        step_of = {"dynatune": 0, "ddp": 0}
        for turn in range(args.repeats + 1):
            for r, fn in runners.items():
                n = args.warmup if turn == 0 else args.steps
                for _ in range(n):
                    dist.barrier()
                    t0, c0 = time.perf_counter(), time.process_time()
                    fn(step_of[r])
                    t1, c1 = time.perf_counter(), time.process_time()
                    if turn > 0:
                        times[r].append(t1 - t0)
                        cpu[r].append(c1 - c0)
                    step_of[r] += 1
        tuner.close_hooks()
        med = {r: statistics.median(v) for r, v in times.items()}
        results[name] = {
            "median_step_s": med, "median_cpu_s": {r: statistics.median(v) for r, v in cpu.items()},
            "dynatune_over_ddp": med["dynatune"] / med["ddp"], "ddp_rebuilds": rebuilds,
            "distinct_plans": len({str(sorted(p.update)) for p in plans}),
            "dynatune_collectives_per_step": statistics.median(collectives), "timed_steps": len(times["ddp"])}
        if rank == 0:
            print(f"{name:6s} dynatune {med['dynatune'] * 1e3:8.1f} ms  ddp {med['ddp'] * 1e3:8.1f} ms  "
                  f"ratio {results[name]['dynatune_over_ddp']:.3f}  rebuilds {rebuilds}  "
                  f"collectives/step {results[name]['dynatune_collectives_per_step']}", flush=True)
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny BERT, 2 turns of 2 steps: proves the script")
    ap.add_argument("--batch", type=int, default=16, help="global batch (each of 2 ranks takes half)")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5, help="steps per turn")
    ap.add_argument("--repeats", type=int, default=6, help="turns per runner")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = ap.parse_args(argv)
    if args.smoke:
        args.batch, args.seq, args.steps, args.repeats, args.warmup = 4, 12, 2, 2, 1
    world = 2
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "results.pt")
        torch.multiprocessing.spawn(_rank_main, args=(world, args, os.path.join(tmp, "store"), out), nprocs=world)
        results = torch.load(out)
    from harness import save

    path = save("distributed_overhead_smoke" if args.smoke else "distributed_overhead_cpu",
                {"world_size": world, "settings": vars(args), "methods": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
