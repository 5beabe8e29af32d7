"""SPSFT against LoRA at equal trainable parameters on a GPU: measured peak and step time in one run.

    python benchmarks/spsft_gpu.py                 # CUDA: Llama-3.2-1B and Qwen2-0.5B (random init), batch 4 x 512
    python benchmarks/spsft_gpu.py --smoke         # tiny-llama / tiny-qwen2 on whatever device there is, 3 steps

Architectures from their configs (dynatune's arch:llama-3.2-1b, arch:qwen2-0.5b), random weights
(memory and time do not depend on the values). Every linear of the blocks: SPSFT with r = 64 and
128 rows against LoRA at rank r/2 (the paper's pairing, about equal trainable parameters), and FA
mode (SPSFT r=128 on the MLP linears) against LoRA r=64 on the MLP linears. Each row: a fresh
model on the device, amp-bf16 by default (fp32 weights and AdamW state, bf16 autocast), the
chunked causal-LM loss, `--steps` optimizer steps on a pad-free batch; records
torch.cuda.max_memory_allocated over the steps after the first (the first builds the optimizer
state), the memory model's predicted peak for the same plan, and the median step time.
Writes benchmarks/results/spsft_gpu[_smoke].json.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from harness import release_cuda, save  # noqa: E402
from spsft_memory import equal_parameter_pairs, fa_pair  # noqa: E402



def configs(ranks):
    return equal_parameter_pairs(ranks) + fa_pair(ranks[-1])


def one(arch, label, name, opts, shape, steps, precision, device):
    from dynatune.engine import Tuner
    from dynatune.losses import chunked_causal_lm_loss
    from dynatune.memory import MemoryModel
    from dynatune.methods import build_method
    from dynatune.models import load_model
    from dynatune.precision import autocast_for

    cuda = device.type == "cuda"
    left = release_cuda()  # what earlier rows left on the GPU: 0, recorded, and kept out of the peak
    with torch.device(device):  # random init straight on the GPU: no host copy
        model, _ = load_model(f"arch:{arch}", "causal-lm", seed=0)
    if precision == "bf16":
        model.to(torch.bfloat16)
    model.to(device).train()
    t = Tuner(model, build_method(name, seed=0, **opts), lr=1e-4, count_memory=not cuda)
    mm = MemoryModel.from_tuner(t, precision=precision, batch_shape=shape, loss="chunked", chunk_tokens=1024,
                                device_type="cuda" if cuda else "cpu")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, shape, generator=g).to(device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    times, peak = [], None
    for step in range(steps):
        if cuda:
            torch.cuda.synchronize()
            if step == 1:
                torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        t.begin_step()
        with autocast_for(precision, device.type):
            loss = chunked_causal_lm_loss(t.model, batch, 1024)
        loss.backward()
        t.after_backward()
        t.optimizer.step()
        t.after_optimizer_step()
        t.optimizer.zero_grad(set_to_none=True)
        t.end_step(None)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if cuda:
        peak = torch.cuda.max_memory_allocated() - left
    pred = mm.predict(t.plan)
    row = {"arch": arch, "label": label, "method": name, "options": opts, "trainable_params": t.params_in(t.plan.update),
           "left_from_earlier_bytes": left, "measured_peak_bytes": peak, "predicted_peak_bytes": pred.predicted_peak_bytes,
           "predicted_terms": pred.terms, "counted_bytes": None if cuda else t.record.counted,
           "median_step_s": statistics.median(times[1:]) if len(times) > 1 else times[0], "loss": float(loss)}
    print(row, flush=True)
    t.close()
    del t, model
    if cuda:
        torch.cuda.empty_cache()
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="tiny-llama / tiny-qwen2, batch 2 x 32, ranks 4/8, 3 steps")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", default="4x512")
    ap.add_argument("--precision", default="amp-bf16", choices=("fp32", "amp-bf16", "bf16"))
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.smoke:
        archs, shape, ranks, steps = ("tiny-llama", "tiny-qwen2"), (2, 32), (4, 8), 3
        precision = "fp32" if device.type == "cpu" else args.precision
    else:
        if device.type != "cuda":
            sys.exit("spsft_gpu.py measures a GPU: no CUDA device here (run --smoke to check the script).")
        b, s = (int(x) for x in args.batch.split("x"))
        archs, shape, ranks, steps, precision = ("llama-3.2-1b", "qwen2-0.5b"), (b, s), (64, 128), args.steps, \
            args.precision
    rows = [one(arch, label, name, opts, shape, steps, precision, device)
            for arch in archs for label, name, opts in configs(ranks)]
    print(save("spsft_gpu" + ("_smoke" if args.smoke else ""),
               {"device": str(device), "batch_shape": list(shape), "precision": precision, "steps": steps,
                "loss": "chunked (1024 tokens)", "rows": rows}))


if __name__ == "__main__":
    main()
