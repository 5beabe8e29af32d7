"""What dynatune's engine costs per step, against a plain PyTorch loop doing the same training.

    python benchmarks/overhead.py                       # CPU, the README's table (5-10 min on 2 shared cores)
    python benchmarks/overhead.py --device cuda --threads 0 --repeats 50 --warmup 5

MiniLM-L6 (the cached pretrained model, 6 labels) in fp32 on fixed random token batches of
16 x 64 (seeded; every step has the same shape, so step times differ only by what each loop does).
For each method (full, topk k=2, lisa, trims at budget 0.6, adagradselect) four runners train their
own copy of the model side by side:
- dynatune: Tuner + the loop's train_step + end_step, with count_memory on, and again with it off;
- plain: a hand-written loop per dynatune runner that replays that runner's plans step by step:
  requires_grad False outside the plan (probed blocks' outputs made to require grad, probed
  parameters' gradients dropped before the update), one AdamW over every candidate parameter
  (it skips parameters without a gradient), the same gradient clipping, one loss read per step.
Runners take turns of --steps steps (A B A B ..., --repeats turns each) after --warmup untimed
steps each. Each step is timed alone: wall time (perf_counter, after a CUDA synchronize) and, on
the CPU, the process's CPU time, which leaves out the time other processes held the cores. Per
runner: the median step time; per method: dynatune / plain as the ratio of medians and as the
median of per-turn ratios (paired turns see the same load). The two plain runners do the same
work when the plans agree, so their ratio is the measurement's own noise.

Writes benchmarks/results/overhead_<device>.json with its provenance (harness.provenance).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).parent))
from harness import load_average, save  # noqa: E402

METHODS = {"full": {}, "topk": {"k": 2}, "lisa": {}, "trims": {}, "adagradselect": {}}
BUDGETS = {"trims": 0.6}  # TriMS's default budget, as `dynatune train` runs it
LR = 1e-4
WEIGHT_DECAY = 0.0  # dynatune's default; AdamW's own (0.01) would give the plain loop extra work
TREC_STEPS_PER_EPOCH = 270  # 4,305 questions / 16: adagradselect's exploration schedule as on TREC


def batches(n: int, batch: int, seq: int, vocab: int, device) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(1000, vocab, (batch, seq), generator=g)
        out.append({"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
                    "labels": torch.randint(0, 6, (batch,), generator=g).to(device)})
    return out


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Dynatune:
    """dynatune's per-step contract, as the loop runs it (train_step, then end_step)."""

    def __init__(self, base, method: str, count_memory: bool, args, device):
        from dynatune.engine import Tuner
        from dynatune.memory import install_budget
        from dynatune.methods import METHODS as REGISTRY, build_method

        m = build_method(method, REGISTRY[method].Config(**METHODS[method]), seed=0)
        if getattr(m, "steps_per_epoch", None) == 0:
            m.steps_per_epoch = TREC_STEPS_PER_EPOCH
        self.tuner = Tuner(copy.deepcopy(base), m, lr=LR, weight_decay=WEIGHT_DECAY, count_memory=count_memory)
        if method in BUDGETS:
            install_budget(self.tuner, BUDGETS[method], batch_shape=(args.batch, args.seq), precision="fp32",
                           grad_accum=1, device_type=device.type)
        self.cfg = SimpleNamespace(grad_clip=1.0, precision="fp32", chunked_loss=0)
        self.device = device
        self.plans: list[tuple] = []  # per step: (updated units, probed blocks, probed params, exit depth)
        self.tuner.model.train()

    def step(self, i: int, batch: dict) -> None:
        from dynatune.loop import train_step

        t = self.tuner
        loss = train_step(t, t.model, [batch], self.cfg, self.device)
        entry = t.end_step(loss)
        self.plans.append((frozenset(entry["update"]), t.plan.probe, t.plan.probe_params, t.plan.exit_depth))

    def close(self) -> None:
        self.tuner.close_hooks()


def probe_output(module, args, out) -> None:
    """A frozen block's output made to require grad, so backward reaches it (TriMS reads its gradient)."""
    t = out if isinstance(out, torch.Tensor) else out[0]
    if not t.requires_grad:
        t.requires_grad_(True)


class Plain:
    """A hand-written loop that freezes what `source` froze at each step; no dynatune code runs."""

    def __init__(self, base, source: Dynatune):
        t = source.tuner
        self.source = source
        self.model = copy.deepcopy(base).train()
        self.params = dict(self.model.named_parameters())
        self.unit_params = {u.name: list(u.param_names) for u in t.units}
        self.blocks = self.model.get_submodule(t.units.blocks_path)
        candidates = [n for n in self.params if n in t.candidate_params]
        for n, p in self.params.items():
            p.requires_grad_(n in t.candidate_params)
        self.opt = torch.optim.AdamW([self.params[n] for n in candidates], lr=LR, weight_decay=WEIGHT_DECAY)
        self.current = None
        self.hooks: list = []

    def names(self, units) -> set[str]:
        return {n for u in units for n in self.unit_params[u]}

    def set_plan(self, plan) -> None:
        """requires_grad and probe hooks, changed only when the plan changes (as a hand-written loop would)."""
        update, probe, probe_params, exit_depth = plan
        if exit_depth is not None:
            raise SystemExit("overhead.py does not replay early exits (MiniLM classification never exits)")
        wanted = self.names(update | probe_params)
        for n, p in self.params.items():
            if p.requires_grad != (n in wanted):
                p.requires_grad_(n in wanted)
        for h in self.hooks:
            h.remove()
        self.hooks = [self.blocks[int(b.split(".")[1])].register_forward_hook(probe_output) for b in sorted(probe)]
        self.dropped = [self.params[n] for n in self.names(probe_params - update)]
        self.current = plan

    def step(self, i: int, batch: dict) -> None:
        plan = self.source.plans[i]
        if plan != self.current:
            self.set_plan(plan)
        loss = self.model(**batch).loss
        loss.backward()
        for p in self.dropped:  # gradients read for a selection, not for an update
            p.grad = None
        torch.nn.utils.clip_grad_norm_([p for p in self.params.values() if p.grad is not None], 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        loss.item()

    def close(self) -> None:
        for h in self.hooks:
            h.remove()


PAIRS = (("count", "dynatune_count", "plain_count"), ("nocount", "dynatune_nocount", "plain_nocount"))


def ratios(times: dict[str, list[list[float]]], dyn: str, plain: str) -> dict:
    """dynatune / plain: of the medians, and the median of per-turn ratios (each dynatune turn over
    the plain turn right after it, so a change in the machine's load hits both sides of a ratio)."""
    med = statistics.median
    flat = {k: [x for turn in times[k] for x in turn] for k in (dyn, plain)}
    return {"of_medians": round(med(flat[dyn]) / med(flat[plain]), 3),
            "paired": round(med([sum(a) / sum(b) for a, b in zip(times[dyn], times[plain])]), 3)}


def run_method(method: str, base, data, args, device) -> dict:
    on = Dynatune(base, method, True, args, device)
    off = Dynatune(base, method, False, args, device)
    runners = {"dynatune_count": on, "plain_count": Plain(base, on),
               "dynatune_nocount": off, "plain_nocount": Plain(base, off)}
    # per runner, per turn, per step: wall seconds and (CPU only) process CPU seconds; CPU time
    # leaves out the time other processes held the cores, which wall time on a shared machine does not
    wall: dict[str, list[list[float]]] = {k: [] for k in runners}
    cpu: dict[str, list[list[float]]] = {k: [] for k in runners}
    done = {k: 0 for k in runners}

    def turn(name, n, record):
        r = runners[name]
        w, c = [], []
        for _ in range(n):
            i = done[name]
            sync(device)
            w0, c0 = time.perf_counter(), time.process_time()
            r.step(i, data[i % len(data)])
            sync(device)
            w.append(time.perf_counter() - w0)
            c.append(time.process_time() - c0)
            done[name] += 1
        if record:
            wall[name].append(w)
            cpu[name].append(c)

    for name in runners:  # each dynatune runner before the plain one that replays it
        turn(name, args.warmup, False)
    for _ in range(args.repeats):
        for name in runners:
            turn(name, args.steps, True)
    for r in runners.values():
        r.close()
    clocks = {"wall": wall} if device.type == "cuda" else {"cpu": cpu, "wall": wall}
    out = {"method": method, "options": METHODS[method], "budget": BUDGETS.get(method),
           # both plain loops replay the same plans unless counting changed the method's choices
           "plans_same_with_and_without_counting": on.plans == off.plans, "distinct_plans": len(set(off.plans))}
    for clock, times in clocks.items():
        out[clock] = {"median_step_s": {k: round(statistics.median(x for t in v for x in t), 4)
                                        for k, v in times.items()},
                      **{f"ratio_{label}": ratios(times, dyn, plain) for label, dyn, plain in PAIRS},
                      # the plain loops against each other: the measurement's own noise
                      "plain_count_vs_plain_nocount": ratios(times, "plain_count", "plain_nocount"),
                      "step_times_s": {k: [round(x, 4) for t in v for x in t] for k, v in times.items()}}
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (CPU); 0 = torch's default. One thread suffers least from other processes")
    ap.add_argument("--steps", type=int, default=1, help="steps per runner per turn")
    ap.add_argument("--repeats", type=int, default=20, help="turns per runner (timed steps = steps x repeats)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per runner before the first turn")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--name", default="", help="suffix of the result file")
    args = ap.parse_args(argv)
    from dynatune.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    load_before = load_average()
    base, _ = load_model("minilm-l6", "classification", num_labels=6)
    base.to(device)
    data = batches(8, args.batch, args.seq, base.config.vocab_size, device)
    rows = []
    t0 = time.perf_counter()
    for method in args.methods.split(","):
        torch.manual_seed(0)
        r = run_method(method, base, data, args, device)
        rows.append(r)
        for clock in ("cpu", "wall"):
            if clock in r:
                c = r[clock]
                print(f"{method:<14} {clock:<5} dynatune/plain counting {c['ratio_count']}, not counting "
                      f"{c['ratio_nocount']}, plain/plain {c['plain_count_vs_plain_nocount']}; "
                      f"medians {c['median_step_s']}", flush=True)
    path = save(f"overhead_{args.device}{args.name}", {
        "settings": {"model": "minilm-l6 (pretrained, 6 labels)", "data": f"fixed random token batches "
                     f"{args.batch} x {args.seq} (8 seeded batches, cycled), all tokens attended",
                     "precision": "fp32", "lr": LR, "weight_decay": WEIGHT_DECAY, "grad_clip": 1.0, "device": args.device,
                     "threads": torch.get_num_threads(), "steps": args.steps, "repeats": args.repeats,
                     "warmup": args.warmup, "adagradselect_steps_per_epoch": TREC_STEPS_PER_EPOCH},
        "load_average_before_after": [load_before, load_average()],
        "wall_s": round(time.perf_counter() - t0, 1), "rows": rows})
    print(path)


if __name__ == "__main__":
    main()
