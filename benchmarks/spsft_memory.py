"""SPSFT's memory against LoRA at about equal trainable parameters, counted byte for byte (CPU).

    python benchmarks/spsft_memory.py            # SmolLM2-135M, batch 8 x 128, two training steps per row
    python benchmarks/spsft_memory.py --smoke    # tiny-llama (random), batch 2 x 16: checks the script

The paper's pairing (§5.3, table 6): SPSFT with r rows per linear against LoRA at rank r/2 (about
equal trainable parameters), every linear of the blocks; and FA mode (D.5: attention frozen, MLP
rows only, against LoRA on the MLP linears), and LoRA with dropout 0.05 (as instruction tuning
usually runs it: peft then saves the dropped copy of x for lora_A as well). Each row trains the model in training mode for two
optimizer steps on a pad-free batch (random tokens, so every token is priced as counted) and
records, at the second step, the counted bytes per term (weights, gradients, AdamW state, saved
activations) with the memory model's prediction, and the paper's "mem = total - inference":
the counted total less the base model's weights (what inference holds), i.e. the training memory
beyond the weights (adapter or delta weights included). Writes benchmarks/results/spsft_memory[_smoke].json.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from harness import counted_steps, save  # noqa: E402

MLP = "gate_proj,up_proj,down_proj"


def equal_parameter_pairs(ranks) -> list[tuple]:
    """SPSFT r rows against LoRA at half that rank (about equal trainable parameters, the paper's
    pairing), as (label, method, options); spsft_gpu.py runs the same pairs."""
    out = []
    for r in ranks:
        out.append((f"spsft_r{r}", "spsft", {"r": r}))
        out.append((f"lora_r{r // 2}", "lora", {"r": r // 2, "alpha": float(r)}))
    return out


def fa_pair(r) -> list[tuple]:
    """FA mode (MLP rows only) against LoRA on the MLP at half the rank."""
    return [(f"spsft_r{r}_FA", "spsft", {"r": r, "freeze_attention": True}),
            (f"lora_r{r // 2}_mlp", "lora", {"r": r // 2, "alpha": float(r), "targets": MLP})]


def rows_to_run(ranks):
    mid = ranks[len(ranks) // 2]
    # LoRA as commonly configured for instruction tuning (dropout 0.05): the dropped copy of x is saved too
    dropout = [(f"lora_r{mid // 2}_dropout", "lora", {"r": mid // 2, "alpha": float(mid), "dropout": 0.05})]
    return equal_parameter_pairs(ranks) + dropout + fa_pair(mid)


def measure(model_name, label, method_name, opts, batch_shape, steps=2):
    from dynatune.engine import Tuner
    from dynatune.memory import MemoryModel
    from dynatune.methods import build_method
    from dynatune.models import load_model

    model, _ = load_model(model_name, "causal-lm", seed=0)
    base_weights = sum(p.numel() * p.element_size() for p in model.parameters())
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, batch_shape, generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    model.train()
    t = Tuner(model, build_method(method_name, seed=0, **opts), lr=1e-4)
    t.set_budget(MemoryModel.from_tuner(t, batch_shape=batch_shape, device_type="cpu"), None)  # prices, no budget
    counted_steps(t, batch, steps)
    pred = t.predict(t.plan)
    rec = t.record
    counted = {"weights": rec.weights, "gradients": rec.gradients, "optimizer": rec.optimizer,
               "activations": rec.activations}
    predicted = {"weights": pred.weights, "gradients": pred.gradients, "optimizer": pred.optimizer,
                 "activations": pred.activations + pred.activations_outside}
    trainable = t.params_in(t.plan.update)
    t.close_hooks()
    row = {"label": label, "method": method_name, "options": opts, "trainable_params": trainable,
           "counted": counted, "counted_total": sum(counted.values()),
           "predicted": predicted, "predicted_total": sum(predicted.values()),
           "predicted_cuda_peak_note": "device_type=cpu: the counted terms are what a CPU budget holds",
           "base_weights": base_weights,
           "beyond_weights": sum(counted.values()) - base_weights}
    print(label, trainable, counted, "beyond weights", row["beyond_weights"], flush=True)
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="tiny-llama (random init), batch 2 x 16, ranks 4/8")
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.smoke:
        model, shape, ranks = "arch:tiny-llama", (2, 16), (4, 8)
    else:
        model, shape, ranks = "smollm2-135m", (8, 128), (32, 64, 128)
    rows = [measure(model, label, name, opts, shape) for label, name, opts in rows_to_run(ranks)]
    by = {r["label"]: r for r in rows}
    pairs = []
    for r in ranks:
        s, lo = by[f"spsft_r{r}"], by[f"lora_r{r // 2}"]
        pairs.append({"spsft": s["label"], "lora": lo["label"], "trainable": [s["trainable_params"], lo["trainable_params"]],
                      "total_saving": 1 - s["counted_total"] / lo["counted_total"],
                      "beyond_weights_saving": 1 - s["beyond_weights"] / lo["beyond_weights"],
                      "activation_saving": 1 - s["counted"]["activations"] / lo["counted"]["activations"]})
    mid = ranks[len(ranks) // 2]
    s, lo = by[f"spsft_r{mid}"], by[f"lora_r{mid // 2}_dropout"]
    pairs.append({"spsft": s["label"], "lora": lo["label"], "trainable": [s["trainable_params"], lo["trainable_params"]],
                  "total_saving": 1 - s["counted_total"] / lo["counted_total"],
                  "beyond_weights_saving": 1 - s["beyond_weights"] / lo["beyond_weights"],
                  "activation_saving": 1 - s["counted"]["activations"] / lo["counted"]["activations"]})
    s, lo = by[f"spsft_r{mid}_FA"], by[f"lora_r{mid // 2}_mlp"]
    pairs.append({"spsft": s["label"], "lora": lo["label"], "trainable": [s["trainable_params"], lo["trainable_params"]],
                  "total_saving": 1 - s["counted_total"] / lo["counted_total"],
                  "beyond_weights_saving": 1 - s["beyond_weights"] / lo["beyond_weights"],
                  "activation_saving": 1 - s["counted"]["activations"] / lo["counted"]["activations"]})
    for p in pairs:
        print(p, flush=True)
    exact = all(r["counted"][k] == r["predicted"][k] for r in rows for k in ("weights", "gradients", "optimizer"))
    worst = max(abs(r["predicted"]["activations"] - r["counted"]["activations"]) / r["counted"]["activations"]
                for r in rows)
    print("weights/gradients/optimizer predicted exactly:", exact, "; worst activation error", worst)
    print(save("spsft_memory" + ("_smoke" if args.smoke else ""),
               {"model": model, "batch_shape": list(shape), "steps": 2, "precision": "fp32", "optimizer": "adamw",
                "rows": rows, "pairs": pairs, "exact_weights_gradients_optimizer": exact,
                "worst_activation_relative_error": worst,
                "paper": "Llama-2-7B all linear: LoRA 23.46 GB vs SPSFT 17.62 GB (25% less); about 12% in FA mode"}))


if __name__ == "__main__":
    main()
