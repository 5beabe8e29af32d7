"""IST at 25% of the layers against LoRA on every layer: measured peak and step time on a GPU.

    python benchmarks/ist_gpu.py                 # Qwen2-0.5B and Llama-3.2-1B (random init), CUDA
    python benchmarks/ist_gpu.py --smoke         # tiny Llama/Qwen2, CPU, 3 steps: checks the script

The paper's table 1 setting scaled to what one GPU holds: LoRA r=32 (alpha 64, dropout 0.05) on
q, k, v, up and down projections; the architectures from their configs with random weights (the
memory does not depend on the values), fp32 weights and AdamW, bf16 autocast, sdpa, HF loss.
`lora`: every layer's adapters train each step; `ist`: ceil(25%) of the layers per step (6 of 24
for Qwen2-0.5B, 4 of 16 for Llama-3.2-1B), importance loop every 10 steps (3 candidate forwards).
Shapes: batch 16 x 256 tokens and the paper's 1 x 1024.

Per (arch, shape, method): `steps` steps through dynatune's own loop step (loop.train_step, so
IST's importance forwards run at steps 9, 19, ...), torch.cuda.max_memory_allocated over all of
them, the weights' bytes, the peak minus the weights (the paper's 36% on LLaMA-7B is of the memory
beyond its 14 GB of weights: LoRA 24 GB vs IST 20 GB), the memory model's predicted peak of the
largest plan, and the median and mean step time (the mean includes the importance loop's share).
On the CPU (--smoke) no allocator peak exists: the counted peak stands in.
Writes benchmarks/results/ist_gpu[_smoke].json with provenance.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).parent))
from harness import release_cuda, save  # noqa: E402

ARCHS = ("qwen2-0.5b", "llama-3.2-1b")
SHAPES = ((16, 256), (1, 1024))
TARGETS = "q_proj,k_proj,v_proj,up_proj,down_proj"


def one(arch: str, shape, method: str, steps: int, device) -> dict:
    from dynatune.engine import Tuner
    from dynatune.loop import train_step
    from dynatune.memory import MemoryModel
    from dynatune.methods import build_method
    from dynatune.models import load_model

    left = release_cuda()  # what earlier runs left on the GPU: 0, recorded, and kept out of the peak
    with torch.device(device):  # random init straight on the GPU: no host copy
        model, _ = load_model(f"arch:{arch}", "causal-lm", seed=0)
    model.to(device)
    opts = dict(r=32, alpha=64.0, dropout=0.05, targets=TARGETS)
    m = build_method("lora", **opts) if method == "lora" else build_method("ist", seed=0, **opts)
    t = Tuner(model, m, lr=1e-4, count_memory=device.type == "cpu")
    B, S = shape
    precision = "amp-bf16"
    mm = MemoryModel.from_tuner(t, precision=precision, batch_shape=(B, S), device_type=device.type)
    t.set_budget(mm, None)  # prices every plan (Tuner.predict_peak, extra forwards included), no budget
    cfg = SimpleNamespace(grad_clip=0.0, precision=precision, chunked_loss=0)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    weights = sum(p.numel() * p.element_size() for p in {id(p): p for p in t.params.values()}.values())
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, predicted = [], []
    for _ in range(steps):
        ids = torch.randint(0, vocab, (B, S), generator=g)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        t0 = time.perf_counter()
        train_step(t, t.model, [batch], cfg, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        predicted.append(t.predict_peak(t.plan))
        t.end_step(None)
    peak = torch.cuda.max_memory_allocated() - left if device.type == "cuda" else t.peak.counted
    layers = sorted({u.split(".")[1] for h in t.history for u in h["update"] if u.startswith("block.")}, key=int)
    row = {"arch": arch, "batch": B, "seq": S, "method": method, "steps": steps,
           "n_u": getattr(m, "n_u", None), "layers_trained": len(layers),
           "trainable_params_per_step": max(t.params_in(h["update"]) for h in t.history),
           "left_from_earlier_bytes": left, "peak_bytes": int(peak), "peak_source": "max_memory_allocated" if device.type == "cuda" else "counted",
           "weights_bytes": int(weights), "peak_minus_weights_bytes": int(peak - weights),
           "predicted_peak_bytes": max(predicted), "median_step_s": statistics.median(times[1:] or times),
           "mean_step_s": statistics.mean(times[1:] or times)}
    t.close()
    del t, model, m
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="tiny Llama/Qwen2 on the CPU, small shapes, 3 steps")
    ap.add_argument("--steps", type=int, default=21, help="steps per run (IST scores at steps 9 and 19)")
    ap.add_argument("--archs", default=",".join(ARCHS))
    args = ap.parse_args()
    if args.smoke:
        device, archs, shapes, steps = torch.device("cpu"), ["tiny-llama", "tiny-qwen2"], [(4, 32), (1, 64)], 3
        torch.set_num_threads(1)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --smoke on the CPU")
        device, archs, shapes, steps = torch.device("cuda"), args.archs.split(","), SHAPES, args.steps
    rows = []
    for arch in archs:
        for shape in shapes:
            pair = {}
            for method in ("lora", "ist"):
                pair[method] = r = one(arch, shape, method, steps, device)
                rows.append(r)
                print(arch, shape, method, f"peak {r['peak_bytes'] / 2**30:.3f} GiB",
                      f"beyond weights {r['peak_minus_weights_bytes'] / 2**30:.3f} GiB",
                      f"predicted {r['predicted_peak_bytes'] / 2**30:.3f} GiB",
                      f"step {r['median_step_s']:.3f} s", flush=True)
            lo, ist = pair["lora"], pair["ist"]
            ist["saving_vs_lora"] = 1 - ist["peak_bytes"] / lo["peak_bytes"]
            ist["saving_beyond_weights_vs_lora"] = 1 - ist["peak_minus_weights_bytes"] / lo["peak_minus_weights_bytes"]
            ist["step_time_ratio_vs_lora"] = ist["median_step_s"] / lo["median_step_s"]
    print(save("ist_gpu" + ("_smoke" if args.smoke else ""), {"rows": rows}))


if __name__ == "__main__":
    main()
