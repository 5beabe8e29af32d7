"""DynaLoRA on a GPU: measured peak and step time of 2/3 and 1/3 of the adapter modules active
against plain LoRA with every module active, in one run.

    python benchmarks/dynalora_gpu.py                       # Qwen2-0.5B architecture on CUDA (the issue's run)
    python benchmarks/dynalora_gpu.py --arch llama-3.2-1b
    python benchmarks/dynalora_gpu.py --smoke               # tiny Llama on the CPU: checks the script

Qwen2-0.5B's architecture (random init: memory and time do not depend on the weights), LoRA r=64
(alpha 128) on every linear layer of the blocks, amp-bf16, AdamW, batches of 16 x 256 random
tokens (the same seeded batches for every runner). Runners: `lora` (every module trains), and
`dynalora` with k = 2/3 and 1/3 of the M modules (forward importance, discounted stochastic
allocator, reallocated every --period=10 steps so several draws are measured), each with state_policy
keep and offload. Each runner trains its own model for --warmup untimed steps, then --steps timed
steps (CUDA synchronized around each). Per runner: torch.cuda.max_memory_allocated over the timed
steps (reset after warm-up), peak minus the weights, the median step time, dynatune's counted
terms at its peak step and the memory model's predicted peak for the run's worst plan. Ratios to
LoRA come from this one invocation. Writes benchmarks/results/dynalora_gpu[_smoke].json.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).parent))
from harness import device_sync as sync, random_token_batches as batches, release_cuda, save  # noqa: E402


def run(label: str, method_name: str, options: dict, args, device, data) -> dict:
    from dynatune.engine import Tuner
    from dynatune.loop import train_step
    from dynatune.memory import MemoryModel
    from dynatune.methods import build_method
    from dynatune.models import load_model

    left = release_cuda()  # what earlier runners left on the GPU: 0, recorded, and kept out of the peak
    with torch.device(device):  # random init straight on the GPU: no host copy
        model, _ = load_model(f"arch:{args.arch}", "causal-lm", seed=0)
    method = build_method(method_name, seed=0, **options)
    tuner = Tuner(model.to(device), method, lr=1e-4)
    mm = MemoryModel.from_tuner(tuner, precision=args.precision, batch_shape=(args.batch, args.seq),
                                device_type=device.type)
    tuner.set_budget(mm, None)  # prices every step's plan; no budget
    cfg = SimpleNamespace(grad_clip=1.0, precision=args.precision, chunked_loss=0)
    tuner.model.train()
    weights = sum(p.numel() * p.element_size() for p in tuner.params.values())
    times, predicted, counted = [], [], []
    for i in range(args.warmup + args.steps):
        if i == args.warmup and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        t0 = time.perf_counter()
        loss = train_step(tuner, tuner.model, [data[i % len(data)]], cfg, device)
        sync(device)
        dt = time.perf_counter() - t0
        entry = tuner.end_step(loss)
        if i >= args.warmup:
            times.append(dt)
            predicted.append(mm.predict(tuner.plan, kept_state=tuner.kept_state(tuner.plan)).predicted_peak_bytes)
            counted.append(tuner.record.counted)
    peak = torch.cuda.max_memory_allocated(device) - left if device.type == "cuda" else None
    plans = {tuple(sorted(h["update"])) for h in tuner.history}
    row = {"label": label, "method": method_name, "options": options,
           "modules": len(getattr(method, "modules", [])) or None, "k": getattr(method, "k", None),
           "draws": len(plans), "trainable_params_max": max(mm.predict(tuner.plan).trainable_params, 0),
           "weights_bytes": weights, "left_from_earlier_bytes": left, "measured_peak_bytes": peak,
           "measured_peak_minus_weights_bytes": None if peak is None else peak - weights,
           "predicted_peak_bytes_max": max(predicted), "counted_bytes_max": max(counted),
           "median_step_s": statistics.median(times), "last_loss": entry["loss"]}
    tuner.close_hooks()
    del tuner, model, method
    print(label, {k: row[k] for k in ("k", "draws", "measured_peak_bytes", "predicted_peak_bytes_max",
                                        "counted_bytes_max", "median_step_s")}, flush=True)
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="qwen2-0.5b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--r", type=int, default=64)
    ap.add_argument("--precision", default="amp-bf16")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--period", type=int, default=10, help="dynalora's reallocation period")
    ap.add_argument("--smoke", action="store_true", help="tiny Llama on the CPU, 2 x 32 tokens, 3 + 4 steps")
    args = ap.parse_args(argv)
    if args.smoke:
        args.arch, args.device, args.batch, args.seq, args.r = "tiny-llama", "cpu", 2, 32, 8
        args.precision, args.warmup, args.steps, args.period = "fp32", 1, 4, 2
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run with --smoke on a CPU, or on a GPU machine")
    from dynatune.models import resolve_config
    vocab = resolve_config(f"arch:{args.arch}").vocab_size
    data = batches(4, args.batch, args.seq, vocab, device)
    adapter = {"targets": "all-linear", "r": args.r, "alpha": 2.0 * args.r}
    runners = [("lora", "lora", dict(adapter))]
    for frac, tag in ((2 / 3, "2/3"), (1 / 3, "1/3")):
        for policy in ("keep", "offload"):
            runners.append((f"dynalora {tag} {policy}", "dynalora",
                            {**adapter, "fraction": round(frac, 4), "period": args.period, "state_policy": policy}))
    rows = [run(label, name, opts, args, device, data) for label, name, opts in runners]
    base = rows[0]
    for row in rows:
        for key in ("measured_peak_bytes", "measured_peak_minus_weights_bytes", "counted_bytes_max", "median_step_s"):
            if row[key] is not None and base[key]:
                row[f"{key}_vs_lora"] = row[key] / base[key]
    name = "dynalora_gpu" + ("_smoke" if args.smoke else "")
    print(save(name, {"arch": args.arch, "device": args.device, "batch": args.batch, "seq": args.seq, "r": args.r,
                      "period": args.period,
                      "precision": args.precision, "warmup": args.warmup, "steps": args.steps, "rows": rows}))


if __name__ == "__main__":
    main()
