"""dynatune beside the tools users would pick instead, under one protocol.

    python benchmarks/peers.py gpu                 # Qwen2-0.5B architecture at 16 x 256 on CUDA: every peer and
                                                   # dynatune method, measured peak and step time, in one run
    python benchmarks/peers.py gpu --smoke         # tiny Llama on the CPU, 2 x 32 tokens: checks the script
    python benchmarks/peers.py lisa-memory         # optimizer-state bytes after each of 8 LISA switches: LISA's
                                                   # public callbacks against dynatune's lisa (CPU, counted exactly)
    python benchmarks/peers.py lisa-memory --device cuda   # the same at 16 x 256 on Qwen2-0.5B, measured peaks too
    python benchmarks/peers.py table --tasks trec --jobs 2 # real data on the CPU: budgets of 100/80/60/40% of full
                                                   # fine-tuning's counted peak, each peer at its largest
                                                   # setting that fits, dynatune's methods at the budget
    python benchmarks/peers.py table --smoke       # 2 steps per run on 32 examples: checks the script
    python benchmarks/peers.py table --model smollm2 --jobs 2   # SmolLM2-135M SFT on trec-sft, 60 steps, one seed

Peers run as their own libraries run them: peft for LoRA, DoRA, VeRA, AdaLoRA (its allocator,
`update_and_allocate`, called after every optimizer step) and SHiRA; `badam` 1.4 for BAdam
(BlockOptimizer with random and ascending switching, and BlockOptimizerRatio); `galore-torch` for
GaLore; plain PyTorch for full fine-tuning, top-k and LISA as its public callbacks do it (one
optimizer over every parameter, blocks switched by requires_grad, so Adam state accrues for every
block ever drawn). dynatune's methods run through its engine and training step. Install the peers
with `pip install -e ".[peers]"`.

GPU protocol (the one ../shared/anchors/anchors_gpu.py measures, so its figures can be run beside
these): random init of the real architecture (memory and time do not depend on the weights), fp32
weights, bf16 autocast, AdamW, batches of 16 x 256 random tokens with labels = inputs, the same
seeded batches for every runner. BAdam also runs in its own recommended setting (bf16 weights, fp32
copies of the active block, no autocast). Each runner builds its own model after the previous one is
released; its measured peak is torch.cuda.max_memory_allocated from before the model is built to the
end of its steps (weights included), its step time the median of the steps after --warmup. Switching
methods switch every --period steps so that several switches fall inside the run. Beside the measured
peak each row has the optimizer-state bytes read by `state_bytes`, which walks any optimizer's state
(BAdam's, GaLore's projectors, AdaLoRA's) rather than only dynatune's.

Real-data protocol (`table`): MiniLM-L6 on the same seeded 1,000 training examples of each task as
the TriMS table (2 epochs, batch 16, max_length 48, 300 validation and 300 test examples), AdamW,
linear warm-up (6%) and decay, gradient clipping at 1.0, the data order of `dynatune train` for the
seed (every runner sees the same batches). A peer's memory is counted as dynatune counts its own:
weights + gradients + optimizer state (`state_bytes`) + tensors saved for backward (dynatune's
SavedTensorCounter), the largest over the steps. Full fine-tuning's counted peak in a 2-step probe
sets the budgets; each peer family's settings are probed the same way, largest first, and the
largest whose probe fits is trained. The families whose memory changes at their switches (LISA's
public callbacks accrue Adam state for every block drawn; BAdam saves activations from its active
block up, so a lower block saves more) are probed over the whole run instead, so that "fits" holds
for every step. dynatune's methods get the budget in bytes and choose their own size under it (`k`,
`r`, `fraction` left to the budget). Learning rates are swept on seed 0 from each
family's candidates and chosen on validation; the other seeds reuse the choice.

Writes benchmarks/results/peers_<what>[_smoke].json (`table`: peers_table_<model>_<task>[_smoke].json, one
per task) with the commit, the command and the machine. `table` also archives every run's records
(result/metrics/config JSON and logs, no plots) in peers_table_<model>[_smoke]_runs.tar.xz; with
--reuse the runs it holds that runs/ lacks are unpacked and read back, not trained again.
"""
from __future__ import annotations

import argparse
import importlib.util
import random
import statistics
import sys
import time
import types
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).parent))
from harness import (RESULTS, device_sync as sync, random_token_batches as batches, release_cuda, save,  # noqa: E402
                     spawned_map)
from trims_budgets import MINILM, SMOLLM2  # noqa: E402  (the TriMS table's protocols: the same runs)


# ---- reading any optimizer's state -------------------------------------------------------------

def _tensors_in(obj, depth: int = 0):
    """Tensors reachable from an optimizer's state: nested dicts, lists and plain objects (GaLore keeps
    its projection matrix in a projector object inside the state)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth < 4 and isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors_in(v, depth + 1)
    elif depth < 4 and isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors_in(v, depth + 1)
    elif depth < 4 and hasattr(obj, "__dict__") and not isinstance(obj, (torch.nn.Module, type)):
        yield from _tensors_in(vars(obj), depth + 1)


def state_bytes(optimizer, exclude=()) -> int:
    """Bytes of the distinct storages an optimizer holds beyond the model's parameters: its state (any
    optimizer's: nested containers and objects are walked), plus, for BAdam, the fp32 copies of the
    active block and the wrapped optimizer's state."""
    from dynatune.memory.counting import storage_key, unique_bytes

    holders = [optimizer.state]
    base = getattr(optimizer, "base_optimizer", None)
    if base is not None:  # BAdam's BlockOptimizer
        holders += [base.state, getattr(optimizer, "param_idx2hp", {})]
    exclude_keys = {storage_key(p) for p in exclude}
    return unique_bytes((t for h in holders for t in _tensors_in(h)), exclude=exclude_keys)


# ---- peers, each as its library runs it ---------------------------------------------------------

def _galore_adamw():
    """galore_torch.adamw.AdamW. The package's __init__ also imports its 8-bit variant, which needs
    bitsandbytes (not used here), so the package is entered without running it."""
    if "galore_torch" not in sys.modules:
        spec = importlib.util.find_spec("galore_torch")
        if spec is None:
            raise SystemExit("galore-torch is not installed: pip install -e '.[peers]'")
        pkg = types.ModuleType("galore_torch")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["galore_torch"] = pkg
    from galore_torch.adamw import AdamW
    return AdamW


def anatomy(model) -> SimpleNamespace:
    """Where a peer finds what it trains: the blocks, their parameter prefix, the modules that train
    with any block set (a classifier's fresh head and pooler; a decoder's final norm), those BAdam
    keeps active (a fresh head only), the embeddings, and what peft must save beside its adapters."""
    if hasattr(model, "bert"):  # MiniLM's classifier: the head is fresh, so every peer trains it
        return SimpleNamespace(layers=model.bert.encoder.layer, prefix="bert.encoder.layer.",
                               with_blocks=[model.bert.pooler, model.classifier],
                               badam_active=["bert.pooler.", "classifier."], embeddings=model.bert.embeddings,
                               peft_save=["classifier"])
    return SimpleNamespace(layers=model.model.layers, prefix="model.layers.", with_blocks=[model.model.norm],
                           badam_active=[], embeddings=model.model.embed_tokens, peft_save=None)


def freeze_all(model):
    for p in model.parameters():
        p.requires_grad_(False)


def adamw(params, lr):
    return torch.optim.AdamW([p for p in params if p.requires_grad], lr=lr)


def peer(family: str, setting):
    """A peer as its library (or public recipe) runs it: setup(model, lr, period, total_steps) ->
    (model, optimizer, after_step or None), after_step(step) called after each optimizer step."""
    def setup(model, lr, period, total_steps):
        a = anatomy(model)
        if family == "full":
            return model, torch.optim.AdamW(model.parameters(), lr=lr), None
        if family == "top":  # the last k blocks and what trains with them
            freeze_all(model)
            for m in (*a.layers[-setting:], *a.with_blocks):
                m.requires_grad_(True)
            return model, adamw(model.parameters(), lr), None
        if family == "lisa_public":
            # LISA as its public callbacks run it: one optimizer built over every parameter; every
            # `period` steps k random blocks switched on by requires_grad, embeddings and head always on.
            # The optimizer keeps the Adam state of every block it ever updated.
            rng, opt = random.Random(0), torch.optim.AdamW(model.parameters(), lr=lr)

            def switch(step):
                if step % period == 0:
                    freeze_all(model)
                    for i in rng.sample(range(len(a.layers)), setting):
                        a.layers[i].requires_grad_(True)
                    for m in (a.embeddings, *a.with_blocks, model.get_output_embeddings() or a.embeddings):
                        m.requires_grad_(True)
            switch(0)
            return model, opt, lambda step: switch(step + 1)
        if family == "badam":  # BlockOptimizer, one block per switch (`setting`: random, ascending)
            from badam import BlockOptimizer

            base = torch.optim.AdamW(model.parameters(), lr=lr)
            opt = BlockOptimizer(base_optimizer=base, named_parameters_list=list(model.named_parameters()),
                                 switch_block_every=period, switch_mode=setting, verbose=0,
                                 block_prefix_list=[[f"{a.prefix}{i}."] for i in range(len(a.layers))],
                                 active_modules=a.badam_active)
            return model, opt, None
        if family == "badam_ratio":  # BlockOptimizerRatio, `setting` of each matrix updated
            from badam import BlockOptimizerRatio

            opt = BlockOptimizerRatio(param_groups=[{"params": list(model.parameters())}],
                                      named_parameters_list=list(model.named_parameters()), update_ratio=setting,
                                      switch_every=period, lr=lr, verbose=0,
                                      include_lm_head=True)  # tied to the frozen embedding: no lm_head of its own
            return model, opt, None
        if family == "galore":
            # GaLore on the blocks' matrices, everything else in a plain AdamW group. Scale 4 is the
            # GaLore paper's fine-tuning recipe (its GLUE runs; 0.25 is its pre-training one, which at
            # fine-tuning rates barely moves the weights); the scale costs no memory and no time
            galore, rest = [], []
            for name, p in model.named_parameters():
                (galore if p.dim() == 2 and name.startswith(a.prefix) else rest).append(p)
            opt = _galore_adamw()([{"params": rest}, {"params": galore, "rank": setting, "update_proj_gap": 200,
                                                       "scale": 4.0, "proj_type": "std"}], lr=lr)
            return model, opt, None
        import peft

        common = {"target_modules": "all-linear", "modules_to_save": a.peft_save}
        if family in ("lora", "dora"):
            cfg = peft.LoraConfig(r=setting, lora_alpha=2 * setting, lora_dropout=0.0, use_dora=family == "dora",
                                  **common)
        elif family == "vera":
            cfg = peft.VeraConfig(r=setting, **common)
        elif family == "shira":
            cfg = peft.ShiraConfig(r=setting, **common)
        elif family == "adalora":  # the allocator prunes the rank to half between the first and last tenth
            tenth = total_steps // 10
            cfg = peft.AdaLoraConfig(init_r=setting, target_r=max(1, setting // 2), lora_alpha=2 * setting,
                                     tinit=tenth, tfinal=tenth, deltaT=1, total_step=total_steps, **common)
        else:
            raise ValueError(f"unknown peer family {family!r}")
        pm = peft.get_peft_model(model, cfg)
        after = (lambda step: pm.base_model.update_and_allocate(step)) if family == "adalora" else None
        return pm, adamw(pm.parameters(), lr), after
    return setup


def peers(n_blocks: int, r: int = 64) -> dict:
    """The GPU runners: {label: (family, setting, weights dtype or None for fp32 + autocast)}."""
    k = max(1, n_blocks // 4)
    return {
        "full": ("full", "all", None),
        f"top{k}": ("top", k, None),
        "lisa2 (public callbacks)": ("lisa_public", 2, None),
        "badam random (bf16 weights)": ("badam", "random", torch.bfloat16),
        "badam ascending (bf16 weights)": ("badam", "ascending", torch.bfloat16),
        "badam random (fp32 + autocast)": ("badam", "random", None),
        "badam ratio 0.1": ("badam_ratio", 0.1, None),
        "galore r128": ("galore", 128, None),
        f"lora r{r}": ("lora", r, None),
        f"dora r{r}": ("dora", r, None),
        "vera r256": ("vera", 256, None),
        f"adalora r{r}->{r // 2}": ("adalora", r, None),
        f"shira r{r}": ("shira", r, None),
    }


def dynatune_runners(n_blocks: int, period: int, r: int = 64) -> dict:
    """{label: (method, options, budget)}: dynatune's methods at settings comparable to the peers'."""
    k = max(1, n_blocks // 4)
    adapter = {"r": r, "alpha": 2.0 * r, "targets": "all-linear"}
    return {
        "dynatune full": ("full", {}, None),
        f"dynatune top{k}": ("topk", {"k": k}, None),
        "dynatune lisa2": ("lisa", {"k": 2, "period": period}, None),
        "dynatune trims @80%": ("trims", {}, 0.8),
        "dynatune trims @60%": ("trims", {}, 0.6),
        "dynatune trims @40%": ("trims", {}, 0.4),
        "dynatune adagradselect k=0.3": ("adagradselect", {}, None),
        f"dynatune lora r{r}": ("lora", adapter, None),
        f"dynatune dynalora r{r} 2/3": ("dynalora", {**adapter, "period": period}, None),
        f"dynatune spsft r{r}": ("spsft", {"r": r}, None),
        "dynatune ist r32": ("ist", {"targets": "all-linear"}, None),
    }


# ---- one runner ------------------------------------------------------------------------------

def build_model(args, device, dtype=None):
    from dynatune.models import load_model

    with torch.device(device):  # random init straight on the device: no host copy
        model, _ = load_model(f"arch:{args.arch}", "causal-lm", seed=0)
    model = model.to(device)
    return model.to(dtype) if dtype is not None else model


def _peak_start(device) -> int:
    left = release_cuda()  # what earlier runners left: recorded and kept out of the peak
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return left


def _row(label, kind, times, left, device, model_params, trainable, opt_bytes, last_loss, **extra) -> dict:
    peak = torch.cuda.max_memory_allocated(device) - left if device.type == "cuda" else None
    return {"label": label, "kind": kind, "measured_peak_bytes": peak,
            "median_step_s": statistics.median(times), "trainable_params": trainable,
            "params": model_params, "optimizer_state_bytes": opt_bytes, "last_loss": last_loss, **extra}


def run_peer(label, family, setting, dtype, args, device, data) -> dict:
    left = _peak_start(device)
    model = build_model(args, device, dtype)
    model, opt, after_step = peer(family, setting)(model, args.lr, args.period, args.warmup + args.steps)
    model.train()
    autocast = dtype is None and args.precision == "amp-bf16"
    times, trainable = [], 0
    for i in range(args.warmup + args.steps):
        sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = model(**data[i % len(data)]).loss
        loss.backward()
        trainable = max(trainable, sum(p.numel() for p in model.parameters() if p.grad is not None))
        opt.step()
        if after_step is not None:
            after_step(i)
        opt.zero_grad(set_to_none=True)
        sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    params = list(model.parameters())
    row = _row(label, "peer", times, left, device, sum(p.numel() for p in params), trainable,
               state_bytes(opt, exclude=params), float(loss), weights_dtype=str(dtype or torch.float32))
    del model, opt, params, after_step
    return row


def run_dynatune(label, name, options, budget, args, device, data) -> dict:
    from dynatune.engine import Tuner
    from dynatune.loop import train_step
    from dynatune.memory import MemoryModel
    from dynatune.memory.install import install_budget, largest_prediction
    from dynatune.methods import build_method

    left = _peak_start(device)
    model = build_model(args, device)
    method = build_method(name, seed=0, **options)
    method.configure_loop(1, args.warmup + args.steps)
    tuner = Tuner(model, method, lr=args.lr)
    shape = (args.batch, args.seq)
    if budget is not None:  # a fraction of full fine-tuning's predicted peak, as `budget=0.6` in a run
        install_budget(tuner, budget, batch_shape=shape, precision=args.precision, device_type=device.type)
    else:  # no budget: the memory model still prices every plan
        tuner.set_budget(MemoryModel.from_tuner(tuner, precision=args.precision, batch_shape=shape,
                                                device_type=device.type), None)
    cfg = SimpleNamespace(grad_clip=0.0, precision=args.precision, chunked_loss=0)
    tuner.model.train()
    times = []
    for i in range(args.warmup + args.steps):
        sync(device)
        t0 = time.perf_counter()
        loss = train_step(tuner, tuner.model, [data[i % len(data)]], cfg, device)
        sync(device)
        tuner.end_step(loss)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    trainable = max(tuner.params_in(h["update"]) for h in tuner.history)  # as metrics.json counts it
    row = _row(label, "dynatune", times, left, device, sum(p.numel() for p in tuner.params.values()), trainable,
               state_bytes(tuner.optimizer, exclude=tuner.params.values()), float(loss), method=name,
               options=options, budget=budget, budget_bytes=tuner.budget_bytes,
               counted_peak_bytes=tuner.peak.counted,
               predicted_peak_bytes_max=largest_prediction(tuner.memory_model, tuner.applied_plans, tuner.predict_peak).get(
                   "predicted_peak_bytes"))
    tuner.close_hooks()
    del tuner, model, method
    return row


# ---- real data on the CPU --------------------------------------------------------------------

SMOKE = ["data.max_train=32", "data.max_eval=16", "max_steps=2"]
# settings per family, largest first; the first that fits a budget is trained
SWITCH_EVERY = 20  # LISA's and BAdam's period on real data (dynatune's lisa.period in the TriMS table)
GROWS_AT_SWITCHES = {"lisa_public", "badam"}  # probed over the whole run, not 2 steps
PEER_FAMILIES = {
    "full": ["all"], "top": [6, 5, 4, 3, 2, 1], "lisa_public": [4, 3, 2, 1], "badam": ["random"],
    "galore": [256, 128, 64, 32, 16], "lora": [64, 32, 16, 8, 4, 2], "dora": [64, 32, 16, 8, 4, 2],
    "vera": [256, 128, 64], "adalora": [64, 32, 16, 8, 4], "shira": [64, 32, 16, 8, 4],
}
RATES = {"full": ("2e-5", "5e-5", "1e-4"), "block": ("1e-4", "3e-4", "1e-3"), "adapter": ("3e-4", "1e-3", "3e-3"),
         "vera": ("1e-3", "4e-3", "1e-2")}
RATE_OF = {"full": "full", "galore": "full", "top": "block", "lisa_public": "block", "badam": "block",
           "lora": "adapter", "dora": "adapter", "adalora": "adapter", "shira": "adapter", "vera": "vera",
           "trims": "block", "adagradselect": "block", "spsft": "adapter", "dynalora": "adapter", "ist": "adapter"}
# SmolLM2-135M SFT on trec-sft (`--model smollm2`): the TriMS table's protocol (SMOLLM2), 60 steps,
# exact match by greedy decoding; one seed and two rates per family bound the CPU time (30 blocks:
# top-k and LISA sizes to match)
SMOLLM2_FAMILIES = {**PEER_FAMILIES, "top": [16, 12, 8, 6, 4, 2, 1], "lisa_public": [8, 4, 2, 1]}
SMOLLM2_RATES = {"full": ("1e-4", "5e-4"), "block": ("1e-4", "5e-4"), "adapter": ("5e-4", "2e-3"),
                 "vera": ("2e-3", "1e-2")}
PROTOCOLS = {  # --model: (overrides, tasks, metric, peer settings, rates, seeds)
    "minilm": (MINILM, "trec,sms-spam,movie-sentiment", "accuracy", PEER_FAMILIES, RATES, "0,1,2"),
    "smollm2": (SMOLLM2, "trec-sft", "exact_match", SMOLLM2_FAMILIES, SMOLLM2_RATES, "0"),
}
DYNATUNE_AT_BUDGET = {"trims": [], "adagradselect": ["adagradselect.k=null"], "spsft": ["spsft.r=null"],
                      "dynalora": ["dynalora.fraction=null"], "ist": ["ist.fraction=null"]}


def train_peer(spec: dict) -> dict:
    """One peer run on real data (a spawned process): spec has task, family, setting, lr, seed, out,
    overrides and probe_steps (0: the whole run, evaluated; n: n steps, counted only; -1: the whole
    run, counted only). Finished runs are read back by pool_map, not here."""
    import json
    import math

    from dynatune.config import load_config
    from dynatune.data.metrics import evaluate
    from dynatune.data.tasks import load_task, task_kind
    from dynatune.loop import epoch_order, linear_schedule, seed_everything
    from dynatune.memory.counting import SavedTensorCounter, grad_bytes, weight_bytes
    from dynatune.models import load_model

    out = Path(spec["out"]) / "result.json"
    torch.set_num_threads(spec.get("threads", 1))
    cfg = load_config(None, [*spec["overrides"], f"task={spec['task']}", f"seed={spec['seed']}"])
    seed_everything(cfg.seed)
    _, tokenizer = load_model(cfg.model, task_kind(cfg.task), seed=cfg.seed, tokenizer_only=True)
    task = load_task(cfg.task, tokenizer, cfg.data, cfg.max_length)
    model, _ = load_model(cfg.model, task.kind, num_labels=task.num_labels, seed=cfg.seed,
                          label_names=task.label_names)
    steps_per_epoch = math.ceil(len(task.train) / cfg.batch_size)
    run_steps = cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * steps_per_epoch
    total = run_steps if spec["probe_steps"] in (0, -1) else spec["probe_steps"]
    model, opt, after = peer(spec["family"], spec["setting"])(model, float(spec["lr"]), SWITCH_EVERY, run_steps)
    sched = linear_schedule(opt, int(cfg.warmup_ratio * run_steps), run_steps)
    device = torch.device("cpu")
    params = list(model.parameters())
    counter = SavedTensorCounter(device)
    counter.attach({"model": model}, params)
    model.train()
    peak, peak_terms, times, trainable, step = 0, {}, [], 0, 0
    for epoch in range(math.ceil(total / steps_per_epoch)):
        order = epoch_order(len(task.train), cfg.seed, epoch)
        for start in range(0, len(order), cfg.batch_size):
            if step >= total:
                break
            t0 = time.perf_counter()
            batch = task.collate([task.train[i] for i in order[start:start + cfg.batch_size]])
            with counter.counting():
                loss = model(**batch).loss
                loss.backward()
            grads = grad_bytes(params, device)
            trainable = max(trainable, sum(p.numel() for p in params if p.grad is not None))
            torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], cfg.grad_clip)
            opt.step()
            if after is not None:
                after(step)
            sched.step()
            terms = {"weights": weight_bytes(params, device), "gradients": grads,
                     "optimizer": state_bytes(opt, exclude=params), "activations": counter.total}
            if sum(terms.values()) > peak:
                peak, peak_terms = sum(terms.values()), terms
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
            step += 1
    counter.detach()
    row = {"task": spec["task"], "family": spec["family"], "setting": spec["setting"], "lr": float(spec["lr"]),
           "seed": spec["seed"], "steps": step, "counted_peak_bytes": peak, "counted_peak_terms": peak_terms,
           "trainable_params": trainable, "median_step_s": statistics.median(times[2:] or times)}
    if not spec["probe_steps"]:
        row["validation"] = evaluate(model, task, "validation", cfg.eval_batch_size, device)
        row["test"] = evaluate(model, task, "test", cfg.eval_batch_size, device)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(row))
    return row


def _train_peer_job(spec):
    try:
        return train_peer(spec)
    except Exception as err:  # noqa: BLE001 - one failed run is a row that says so
        return {**{k: spec[k] for k in ("task", "family", "setting", "lr", "seed")},
                "error": f"{type(err).__name__}: {err}"[:500]}


def finished_peer(spec: dict) -> dict | None:
    """With reuse, the row of a peer run already made, or None."""
    import json

    out = Path(spec["out"]) / "result.json"
    return json.loads(out.read_text()) if spec.get("reuse") and out.exists() else None


def pool_map(fn, specs, jobs):
    """fn over peer specs, `jobs` spawned processes at a time, in order; finished ones read back here."""
    return spawned_map(fn, specs, jobs, finished_peer)


RECORDS = ("result.json", "config.json", "metrics.json", "log.jsonl", "evals.jsonl")  # what --reuse reads back


def table_root(args) -> Path:
    return Path("runs") / ("peers-table" + ("" if args.model == "minilm" else f"-{args.model}")
                           + ("-smoke" if args.smoke else ""))


def records_archive(args) -> Path:
    return RESULTS / f"peers_table_{args.model}{'_smoke' if args.smoke else ''}_runs.tar.xz"


def archive_runs(root: Path, archive: Path) -> None:
    """Every run's records under root (not its plots) into archive, replaced whole: the table's raw
    data, and what lets a later --reuse (on another machine) go on where this one stopped."""
    import tarfile

    tmp = archive.with_name(archive.name + ".tmp")
    with tarfile.open(tmp, "w:xz") as tar:
        for path in sorted(root.glob("*/*")):
            if path.name in RECORDS:
                tar.add(path, arcname=str(path.relative_to(root)))
    tmp.replace(archive)


def restore_runs(root: Path, archive: Path) -> None:
    """The archived runs that root lacks, unpacked into it, so that --reuse reads them back."""
    import tarfile

    with tarfile.open(archive) as tar:
        missing = [m for m in tar.getmembers() if not (root / Path(m.name).parts[0]).exists()]
        tar.extractall(root, members=missing, filter="data")


def cmd_table(args) -> dict:
    """Budgets of each task from full fine-tuning's counted probe; each peer family's largest setting
    that fits each budget (probed); the learning-rate sweep on seed 0; the other seeds; dynatune's
    methods at each budget through `dynatune train` (harness.run_many)."""
    from harness import run_many

    protocol, default_tasks, metric, settings, all_rates, default_seeds = PROTOCOLS[args.model]
    overrides = protocol + (SMOKE if args.smoke else [])
    root = table_root(args)
    tasks = (args.tasks or default_tasks).split(",")
    budgets = [float(b) for b in args.budgets.split(",")]
    seeds = [0] if args.smoke else [int(s) for s in (args.seeds or default_seeds).split(",")]
    rates = {k: v[1:2] for k, v in all_rates.items()} if args.smoke else all_rates
    families = args.families.split(",") if args.families else list(settings)

    def spec(task, family, setting, lr, seed, probe=0):
        tag = ("probe-run" if probe < 0 else f"probe{probe}") if probe else f"lr{lr}-{seed}"
        return {"task": task, "family": family, "setting": setting, "lr": lr, "seed": seed, "probe_steps": probe,
                "overrides": overrides, "reuse": args.reuse, "threads": args.threads,
                "out": str(root / f"{task}-{family}-{setting}-{tag}")}

    # 1. probes: every family's every setting, 2 steps (the switching ones: the whole run), counted
    probe_specs = [spec(t, f, s, rates[RATE_OF[f]][0], 0, probe=-1 if f in GROWS_AT_SWITCHES else 2)
                   for t in tasks for f in families
                   for s in settings[f]]
    probes = pool_map(_train_peer_job, probe_specs, args.jobs)
    counted = {(p["task"], p["family"], p["setting"]): p.get("counted_peak_bytes") for p in probes}
    budget_bytes = {(t, b): b * counted[(t, "full", "all")] for t in tasks for b in budgets}
    # 2. the largest setting of each family that fits each budget
    chosen = {}
    for (t, b), limit in budget_bytes.items():
        for f in families:
            fits = [s for s in settings[f] if (counted.get((t, f, s)) or float("inf")) <= limit]
            chosen[(t, b, f)] = fits[0] if fits else None  # None: does not fit
    configs = sorted({(t, f, s) for (t, b, f), s in chosen.items() if s is not None}, key=str)
    # 3. dynatune's methods at each budget, in bytes
    dyn = {(t, b, m): [*overrides, f"task={t}", f"method={m}", *extra,
                       f"budget={int(budget_bytes[(t, b)])}B"]
           for t in tasks for b in budgets for m in (args.methods.split(",") if args.methods else DYNATUNE_AT_BUDGET)
           for extra in [DYNATUNE_AT_BUDGET[m]]}

    def dyn_run(key, lr, seed):
        t, b, m = key
        return [*dyn[key], f"lr={lr}", f"seed={seed}", "count_memory=true",
                f"output_dir={root}/{t}-dynatune-{m}-b{b}-lr{lr}-{seed}"]

    # 4. the sweep on seed 0, then the other seeds at the chosen rate
    sweep_peer = [spec(t, f, s, lr, 0) for t, f, s in configs for lr in rates[RATE_OF[f]]]
    sweep_dyn = [(k, lr) for k in dyn for lr in rates[RATE_OF[k[2]]]]
    peer_rows = pool_map(_train_peer_job, sweep_peer, args.jobs)
    dyn_rows = run_many([dyn_run(k, lr, 0) for k, lr in sweep_dyn], args.jobs, args.reuse, args.threads)

    def val(r):
        return (r.get("validation") or {}).get(metric, -1) if "error" not in r else -1

    best_peer = {}  # (task, family, setting) -> (rate as swept, seed 0's row), the best on validation
    for sp, r in zip(sweep_peer, peer_rows):
        key = (sp["task"], sp["family"], sp["setting"])
        if key not in best_peer or val(r) > val(best_peer[key][1]):
            best_peer[key] = (sp["lr"], r)
    best_dyn = {}
    for (k, lr), r in zip(sweep_dyn, dyn_rows):
        if k not in best_dyn or val(r) > val(best_dyn[k][1]):
            best_dyn[k] = (lr, r)
    more_peer = [spec(t, f, s, best_peer[(t, f, s)][0], seed) for t, f, s in configs for seed in seeds if seed != 0]
    more_dyn = [(k, best_dyn[k][0], seed) for k in dyn for seed in seeds if seed != 0]
    more_peer_rows = pool_map(_train_peer_job, more_peer, args.jobs)
    more_dyn_rows = run_many([dyn_run(k, lr, s) for k, lr, s in more_dyn], args.jobs, args.reuse, args.threads)

    rows = []
    for t, b, f in chosen:
        s = chosen[(t, b, f)]
        if s is None:  # no setting fits; a probe that failed is an error, not a size
            errors = sorted({p["error"] for p in probes if (p["task"], p["family"]) == (t, f) and "error" in p})
            rows.append({"task": t, "budget": b, "label": f, "kind": "peer", "fits": False,
                         **({"error": errors[0]} if errors else {})})
            continue
        first = best_peer[(t, f, s)][1]
        seeded = [first] + [r for sp, r in zip(more_peer, more_peer_rows)
                            if (sp["task"], sp["family"], sp["setting"]) == (t, f, s)]
        rows += [{**r, "budget": b, "label": f"{f} {s}" if s is not None and f != "full" else f, "kind": "peer",
                  "fits": True} for r in seeded]
    for k in dyn:
        t, b, m = k
        lr, first = best_dyn[k]
        seeded = [first] + [r for (k2, _, _), r in zip(more_dyn, more_dyn_rows) if k2 == k]
        rows += [{**r, "task": t, "budget": b, "label": f"dynatune {m}", "kind": "dynatune", "lr": float(lr),
                  "fits": "error" not in r} for r in seeded]
    return {"protocol": overrides, "metric": metric, "budgets": budgets, "seeds": seeds, "rates": rates,
            "full_counted_probe_bytes": {t: counted[(t, "full", "all")] for t in tasks},
            "budget_bytes": {f"{t}@{b}": v for (t, b), v in budget_bytes.items()},
            "probes": probes, "chosen_settings": {f"{t}@{b}/{f}": s for (t, b, f), s in chosen.items()},
            "sweep": [{**r, "kind": "peer"} for r in peer_rows] + [{**r, "kind": "dynatune", "key": list(k), "lr": float(lr)}
                                                                   for (k, lr), r in zip(sweep_dyn, dyn_rows)],
            "rows": rows}


# ---- commands --------------------------------------------------------------------------------

def smoke_settings(args):
    args.arch, args.device, args.batch, args.seq = "tiny-llama", "cpu", 2, 32
    args.precision, args.warmup, args.steps, args.period, args.r = "fp32", 1, 4, 2, 8


def cmd_gpu(args, on_row=lambda payload: None) -> dict:
    """Every runner in turn; on_row(payload so far) after each, so a run cut short keeps its rows."""
    device = torch.device(args.device)
    from dynatune.models import resolve_config

    config = resolve_config(f"arch:{args.arch}")
    data = batches(4, args.batch, args.seq, config.vocab_size, device)
    only = set(args.only.split(",")) if args.only else None
    runners = [(label, lambda f=family, s=setting, d=dtype, l=label: run_peer(l, f, s, d, args, device, data))
               for label, (family, setting, dtype) in peers(config.num_hidden_layers, args.r).items()]
    runners += [(label, lambda n=name, o=options, b=budget, l=label: run_dynatune(l, n, o, b, args, device, data))
                for label, (name, options, budget) in dynatune_runners(config.num_hidden_layers, args.period,
                                                                       args.r).items()]
    payload = {"arch": args.arch, "device": args.device, "batch": args.batch, "seq": args.seq, "r": args.r,
               "precision": args.precision, "warmup": args.warmup, "steps": args.steps, "period": args.period,
               "rows": []}
    for label, fn in runners:
        if only is None or label in only:
            payload["rows"].append(_guarded(label, fn))
            _ratios_to_full(payload["rows"])
            on_row(payload)
    return payload


def _ratios_to_full(rows) -> None:
    full = next((r for r in rows if r["label"] == "full" and r.get("measured_peak_bytes")), None)
    for r in rows:
        if full and r.get("measured_peak_bytes"):
            r["measured_peak_vs_full"] = r["measured_peak_bytes"] / full["measured_peak_bytes"]
            r["step_vs_full"] = r["median_step_s"] / full["median_step_s"]


def _guarded(label, fn) -> dict:
    """One runner; a peer that fails (out of memory, a library that refuses the model) is a row that says
    so, not a lost run."""
    try:
        row = fn()
    except Exception as err:  # noqa: BLE001 - every failure becomes a row
        row = {"label": label, "error": f"{type(err).__name__}: {err}"[:500]}
    print(label, {k: row.get(k) for k in ("measured_peak_bytes", "median_step_s", "trainable_params",
                                          "optimizer_state_bytes", "error")}, flush=True)
    return row


def cmd_lisa_memory(args) -> dict:
    """Optimizer-state bytes after each switch, LISA's public callbacks vs dynatune's lisa (drop)."""
    from dynatune.engine import Tuner
    from dynatune.loop import train_step
    from dynatune.methods import build_method
    from dynatune.models import resolve_config

    device = torch.device(args.device)
    config = resolve_config(f"arch:{args.arch}")
    data = batches(2, args.batch, args.seq, config.vocab_size, device)
    steps = args.switches * args.period
    out = {}
    # public callbacks: one optimizer over every parameter
    left = _peak_start(device)
    model = build_model(args, device)
    model.train()
    model, opt, after = peer("lisa_public", 2)(model, args.lr, args.period, steps)
    public = []
    for i in range(steps):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "amp-bf16"):
            loss = model(**data[i % len(data)]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (i + 1) % args.period == 0:  # the end of a period, before the next draw
            public.append(_switch_point(i, state_bytes(opt, exclude=list(model.parameters())), left, device))
        after(i)
    out["public_callbacks"] = public
    del model, opt, after
    # dynatune's lisa: state of blocks that leave is freed
    left = _peak_start(device)
    model = build_model(args, device)
    method = build_method("lisa", seed=0, k=2, period=args.period)
    tuner = Tuner(model, method, lr=args.lr)
    tuner.model.train()
    cfg = SimpleNamespace(grad_clip=0.0, precision=args.precision, chunked_loss=0)
    ours = []
    for i in range(steps):
        loss = train_step(tuner, tuner.model, [data[i % len(data)]], cfg, device)
        tuner.end_step(loss)
        if (i + 1) % args.period == 0:
            ours.append(_switch_point(i, state_bytes(tuner.optimizer, exclude=list(tuner.params.values())),
                                      left, device, counted=tuner.record.optimizer))
    out["dynatune_lisa"] = ours
    tuner.close_hooks()
    return {"arch": args.arch, "device": args.device, "batch": args.batch, "seq": args.seq,
            "precision": args.precision, "period": args.period, "switches": args.switches, "k": 2, **out}


def _switch_point(step, opt_bytes, left, device, counted=None) -> dict:
    point = {"step": step + 1, "optimizer_state_bytes": opt_bytes}
    if counted is not None:
        point["engine_counted_optimizer_bytes"] = counted
    if device.type == "cuda":
        point["measured_peak_bytes"] = torch.cuda.max_memory_allocated(device) - left
    return point


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["gpu", "lisa-memory", "table"])
    ap.add_argument("--arch", default=None, help="default: qwen2-0.5b (gpu), smollm2-135m (lisa-memory on the CPU)")
    ap.add_argument("--device", default=None, help="default: cuda (gpu), cpu (lisa-memory)")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--precision", default="amp-bf16")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--r", type=int, default=64, help="adapter rank (LoRA, DoRA, AdaLoRA's initial, SHiRA, SPSFT rows)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--period", type=int, default=4, help="steps between switches (LISA, BAdam, DynaLoRA)")
    ap.add_argument("--switches", type=int, default=8, help="lisa-memory: periods measured")
    ap.add_argument("--only", default=None, help="gpu: comma-separated row labels")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--model", choices=sorted(PROTOCOLS), default="minilm",
                    help="table: MiniLM-L6 on classification tasks, or SmolLM2-135M SFT on trec-sft")
    ap.add_argument("--tasks", default=None, help="table: tasks (default: the model's protocol's)")
    ap.add_argument("--budgets", default="1.0,0.8,0.6,0.4", help="table: fractions of full's counted peak")
    ap.add_argument("--seeds", default=None, help="table: seeds (rates are chosen on seed 0; default 0,1,2 on "
                                                  "MiniLM, 0 on SmolLM2)")
    ap.add_argument("--families", default=None, help="table: peer families (default: all of PEER_FAMILIES)")
    ap.add_argument("--methods", default=None, help="table: dynatune methods at the budget (default: all)")
    ap.add_argument("--jobs", type=int, default=1, help="table: runs at a time, each in its own process")
    ap.add_argument("--threads", type=int, default=1, help="table: torch threads per run")
    ap.add_argument("--reuse", action="store_true", help="table: read back finished runs")
    args = ap.parse_args(argv)
    on_cpu = args.what == "lisa-memory" and args.device in (None, "cpu")
    args.arch = args.arch or ("smollm2-135m" if on_cpu else "qwen2-0.5b")
    args.device = args.device or ("cpu" if on_cpu else "cuda")
    args.batch = args.batch or (2 if on_cpu else 16)
    args.seq = args.seq or (64 if on_cpu else 256)
    if args.what == "table":  # one file per task, written when that task's table is done: a task
        args.device = "cpu"    # finished is kept even if a later one is interrupted
        if args.reuse and records_archive(args).exists():
            restore_runs(table_root(args), records_archive(args))
        for task in (args.tasks or PROTOCOLS[args.model][1]).split(","):
            one = argparse.Namespace(**{**vars(args), "tasks": task})
            print(save(f"peers_table_{args.model}_{task}" + ("_smoke" if args.smoke else ""), cmd_table(one)),
                  flush=True)
            archive_runs(table_root(args), records_archive(args))
        return
    if args.smoke:
        smoke_settings(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run with --smoke on a CPU, or on a GPU machine")
    name = "peers_" + args.what.replace("-", "_") + ("" if args.device == "cpu" or args.what == "gpu" else "_cuda")
    name += "_smoke" if args.smoke else ""
    payload = cmd_gpu(args, lambda p: save(name, p)) if args.what == "gpu" else cmd_lisa_memory(args)
    print(save(name, payload))


if __name__ == "__main__":
    main()
