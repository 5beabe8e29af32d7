"""DynatuneTrainer runs for tests/test_distributed.py, under torchrun / accelerate launch or alone.

    python tests/trainer_worker.py OUT METHODS GRAD_ACCUM [RESUMED] [STRATEGY]

For each method of METHODS (comma-separated): a tiny BERT classifier without dropout, 16
examples, 2 per device per micro-batch, GRAD_ACCUM micro-batches per step, 4 steps, a checkpoint
every 2. Each rank writes OUT/<method>-rank<r>.pt: the engine's plans and losses per step and the
final weights. For each method of RESUMED, the run is then resumed from its checkpoint-2 and
written as OUT/<method>-resumed-rank<r>.pt. STRATEGY (ddp, the default, or fsdp) is
DynatuneTrainer's; under fsdp the weights are gathered whole and the trained model is saved with
trainer.save_model into OUT/<method>/final.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))

from dist_worker import NO_DROPOUT, OPTIONS, full  # noqa: E402
from tiny import classifier, cls_examples, collate  # noqa: E402


def train(out: Path, name: str, grad_accum: int, resume: str | None = None, strategy: str = "ddp") -> dict:
    from transformers import TrainingArguments

    from dynatune.integrations.hf import DynatuneCallback, DynatuneTrainer, prepare
    from dynatune.methods import build_method

    base, _, best = name.partition("+")  # "<method>+best": evaluated every 2 steps, the best loaded at the end
    evaluated = dict(eval_strategy="steps", eval_steps=2, load_best_model_at_end=True, metric_for_best_model="loss",
                     greater_is_better=False) if best else {}
    args = TrainingArguments(output_dir=str(out / name), per_device_train_batch_size=2,
                             gradient_accumulation_steps=grad_accum, max_steps=4, learning_rate=1e-3,
                             lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, save_strategy="steps",
                             save_steps=2, logging_steps=1, report_to="none", use_cpu=True, seed=0,
                             disable_tqdm=True, dataloader_num_workers=0, **evaluated)
    method = build_method(base, seed=0, **OPTIONS[base])
    data = cls_examples(16)
    model = prepare(classifier("bert", **NO_DROPOUT), method, data, collate)
    cb = DynatuneCallback(method)
    trainer = DynatuneTrainer(model=model, args=args, train_dataset=data, callbacks=[cb], strategy=strategy,
                              eval_dataset=cls_examples(8, seed=2) if best else None)
    trainer.train(resume_from_checkpoint=resume)
    if strategy == "fsdp":
        trainer.save_model(str(out / name / "final"))
    t = cb.tuner
    t.close_hooks()
    return {"history": [{k: h.get(k) for k in ("step", "loss", "update", "promoted", "method_log")} for h in t.history],
            "weights": {n: full(p) for n, p in t.params.items()},  # FSDP2's shards gathered whole
            "logged_losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
            "sharded": t.shards_gradients, "best_checkpoint": trainer.state.best_model_checkpoint}


def main(argv):
    out, methods, grad_accum = Path(argv[0]), argv[1].split(","), int(argv[2])
    resumed = argv[3].split(",") if len(argv) > 3 and argv[3] else []
    strategy = argv[4] if len(argv) > 4 else "ddp"
    rank = int(os.environ.get("RANK", "0"))
    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    for name in methods:
        torch.save(train(out, name, grad_accum, strategy=strategy), out / f"{name}-rank{rank}.pt")
        if name in resumed:
            ckpt = out / name / "checkpoint-2"
            torch.save(train(out, name, grad_accum, str(ckpt), strategy), out / f"{name}-resumed-rank{rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1:])
