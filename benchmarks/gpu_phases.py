"""Where a step's GPU memory peaks, phase by phase, beside the memory model's phases: the data to
find which term a prediction misses when predicted and measured peaks disagree.

    python benchmarks/gpu_phases.py             # CUDA: Qwen2-0.5B and Llama-3.2-1B (random init)
    python benchmarks/gpu_phases.py --smoke     # tiny Llama on the CPU: checks the script (no peaks)

Per configuration (architecture, batch shape, method and options): a fresh model built on the
device, amp-bf16 (fp32 weights and AdamW state, bf16 autocast), Hugging Face's own loss, three
steps. In the third step, torch.cuda.max_memory_allocated is read and reset around the forward
(loss included), the backward and the optimizer step, and memory_allocated after each; the row
holds those with the memory model's predicted phases and terms for the same plan.
Writes benchmarks/results/gpu_phases[_smoke].json.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from harness import release_cuda, save  # noqa: E402

QKVUD = "q_proj,k_proj,v_proj,up_proj,down_proj"
CONFIGS = [  # (arch, (batch, seq), label, method, options)
    ("qwen2-0.5b", (16, 256), "lora_r32_dropout", "lora", dict(r=32, alpha=64.0, dropout=0.05, targets=QKVUD)),
    ("qwen2-0.5b", (16, 256), "lora_r32", "lora", dict(r=32, alpha=64.0, dropout=0.0, targets=QKVUD)),
    ("qwen2-0.5b", (16, 256), "lora_r64_all", "lora", dict(r=64, alpha=128.0, targets="all-linear")),
    ("qwen2-0.5b", (16, 256), "top2", "topk", dict(k=2)),
    ("qwen2-0.5b", (16, 256), "full", "full", {}),
    ("llama-3.2-1b", (1, 1024), "lora_r32_dropout", "lora", dict(r=32, alpha=64.0, dropout=0.05, targets=QKVUD)),
    ("llama-3.2-1b", (1, 1024), "lora_r32", "lora", dict(r=32, alpha=64.0, dropout=0.0, targets=QKVUD)),
    ("llama-3.2-1b", (1, 1024), "top2", "topk", dict(k=2)),
]


def one(arch, shape, label, name, opts, device) -> dict:
    from dynatune.engine import Tuner
    from dynatune.memory import MemoryModel
    from dynatune.methods import build_method
    from dynatune.models import load_model
    from dynatune.precision import autocast_for

    cuda = device.type == "cuda"
    left = release_cuda()
    with torch.device(device):
        model, _ = load_model(f"arch:{arch}", "causal-lm", seed=0)
    model.train()
    t = Tuner(model, build_method(name, seed=0, **opts), lr=1e-4, count_memory=not cuda)
    precision = "amp-bf16" if cuda else "fp32"
    mm = MemoryModel.from_tuner(t, precision=precision, batch_shape=shape, device_type=device.type)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, shape, generator=g).to(device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    measured = {}

    def mark(phase):
        if cuda:
            torch.cuda.synchronize()
            measured[phase] = {"peak": torch.cuda.max_memory_allocated() - left,
                               "allocated_after": torch.cuda.memory_allocated() - left}
            torch.cuda.reset_peak_memory_stats()

    for step in range(3):
        t.begin_step()
        mark("before_forward")
        with autocast_for(precision, device.type):
            loss = t.model(**batch).loss
        mark("forward")
        loss.backward()
        t.after_backward()
        mark("backward")
        t.optimizer.step()
        t.after_optimizer_step()
        t.optimizer.zero_grad(set_to_none=True)
        mark("optimizer")
        t.end_step(None)
    pred = mm.predict(t.plan, kept_state=t.kept_state(t.plan))
    peak = max(v["peak"] for v in measured.values()) if cuda else None
    row = {"arch": arch, "batch_shape": list(shape), "label": label, "method": name, "options": opts,
           "left_from_earlier_bytes": left, "measured_phases": measured, "measured_peak_bytes": peak,
           "predicted_peak_bytes": pred.predicted_peak_bytes, "predicted_peak_phase": pred.peak_phase,
           "predicted_phases": pred.phases, "predicted_terms": pred.terms,
           "predicted_counted_terms": pred.counted_terms,
           "error": None if peak is None else pred.predicted_peak_bytes / peak - 1}
    print(arch, shape, label, "measured", peak, "predicted", pred.predicted_peak_bytes, pred.peak_phase,
          "error", row["error"], flush=True)
    t.close()
    del t, model
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="tiny Llama on the CPU: checks the script")
    args = ap.parse_args()
    if args.smoke:
        device = torch.device("cpu")
        configs = [("tiny-llama", (2, 16), label, name, {**opts, **({"r": 4} if "r" in opts else {})})
                   for _, _, label, name, opts in CONFIGS[:5]]
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --smoke on the CPU")
        device, configs = torch.device("cuda"), CONFIGS
    rows = [one(*c, device) for c in configs]
    print(save("gpu_phases" + ("_smoke" if args.smoke else ""), {"rows": rows}))


if __name__ == "__main__":
    main()
