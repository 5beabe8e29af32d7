"""`dynatune estimate`: every family of plans priced before anything trains, on a CPU.

    dynatune estimate model=arch:qwen2-0.5b batch_size=16 seq_len=256 precision=amp-bf16 budget=0.6 [--json]

For a model (or an architecture) and a batch shape, the memory model (memory/model.py) prices:
full fine-tuning; top-k blocks (+ final norm) for each k; bottom-k; LISA with k blocks (+ embeddings
and final norm); LoRA on all linear layers at each power-of-two rank; early exit at each depth e
with the top k blocks below it training (k in 1, n/4, e/2, e); DynaLoRA with k of its M adapter
modules active (k in M/3, 2M/3, M), at the worst placement (the lowest module in block 0, then the
largest: what any draw may cost) and at the cheapest (the k modules highest up: what a budget
that keeps draws above a depth buys). Each row has the predicted peak
(torch.cuda.max_memory_allocated on the target device) and the predicted counted bytes, per term.
With a budget, rows that fit are marked and each family's largest fitting setting has
`fits_best: true`.

The full-size model is built on the meta device (exact parameter bytes, no memory); activations
are probed on a 4-block model of the same config on the CPU, so models that need a GPU to train
are estimated on a laptop.
"""
from __future__ import annotations

import json
import sys
from types import SimpleNamespace

from .errors import DynatuneError
from .memory import (DEFAULT_MARGIN, DEVICE_TYPES, LOSSES, MemoryModel, check_margin, fmt_bytes, parse_budget,
                     resolve_budget, usable_budget)
from .methods import build_method
from .methods.adapters import LoraConfig, target_linears
from .models import ENCODER_TYPES, resolve_config
from .plan import Plan
from .precision import check_precision

FAMILIES = ("full", "top", "bottom", "lisa", "lora", "exit", "dynalora", "spsft")

# key: (default, parser, help)
OPTIONS = {
    "model": (None, str, "arch:NAME, a known model name, or a local Hugging Face directory (required)"),
    "kind": ("auto", str, "causal-lm, classification or regression; auto: classification for encoders"),
    "num_labels": (2, int, "classes of a classification head"),
    "batch_size": (16, int, "examples per optimizer step"),
    "grad_accum": (1, int, "micro-batches per step (the micro-batch is batch_size / grad_accum)"),
    "seq_len": (256, int, "tokens per example"),
    "precision": ("fp32", str, "fp32, amp-bf16, amp-fp16 (priced as amp-bf16: the same bytes) or bf16"),
    "optimizer": ("adamw", str, "adamw, adam, sgd, sgd-momentum or adafactor"),
    "budget": (None, str, "bytes with a unit (12GiB) or a fraction of full fine-tuning's peak (0.6)"),
    "margin": (DEFAULT_MARGIN, float, "fraction of the budget kept free"),
    "chunked_loss": (0, int, "tokens per chunk of the chunked LM loss; 0 = the model's own loss"),
    "loss": ("hf", str, "hf (model(**batch).loss), chunked, or sliced (user code keeping fp32 logits)"),
    "device_type": ("cuda", str, "the device whose peak is predicted: cuda or cpu"),
    "families": (",".join(FAMILIES), str, "comma list of " + ", ".join(FAMILIES)),
    "lora_ranks": ("", str, "comma list of LoRA ranks; default: every power of two up to the largest min(d_in, d_out)"),
    "dynalora_r": (8, int, "rank of DynaLoRA's LoRA modules"),
    "dynalora_targets": ("query,value,q_proj,v_proj", str, "DynaLoRA's adapted linears (its default: query/value)"),
    "spsft_ranks": ("8,16,32,64,128,256", str, "comma list of SPSFT's rows per linear (r)"),
    "spsft_fa": (False, bool, "SPSFT's FA mode: attention frozen, MLP rows only"),
    "lora_cap": (True, bool, "cap each module's LoRA rank at min(d_in, d_out), as dynatune's lora method does"),
    "hold_logits": (False, bool, "the caller keeps the model output alive through backward"),
    "gradient_checkpointing": (False, bool, "blocks recompute their activations in backward"),
    "world_size": (1, int, "ranks of a data-parallel run: each row prices one rank (batch_size is the global batch)"),
    "strategy": ("ddp", str, "ddp (replicated, plus a gradient bucket) or fsdp (FSDP2 fully_shard per block: sharded)"),
}


def _parse_bool(v) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise ValueError(v)


def parse_options(overrides) -> SimpleNamespace:
    """key=value strings -> checked options (unknown keys and bad values raise). A dict or a
    config object (e.g. a training RunConfig) gives the keys it shares with estimate's; the rest
    of it (method, task, ...) is ignored."""
    aliases = {"max_length": "seq_len", "seq": "seq_len", "batch": "batch_size"}
    if isinstance(overrides, dict) or (hasattr(overrides, "__dict__") and not isinstance(overrides, (list, tuple))):
        d = overrides if isinstance(overrides, dict) else vars(overrides)
        items = [(k, v) for k, v in d.items() if aliases.get(k, k) in OPTIONS]
    else:
        items = []
        for item in overrides or []:
            if "=" not in item:
                raise DynatuneError(f"'{item}' is not of the form key=value; estimate takes "
                                    f"{', '.join(OPTIONS)} (e.g. model=arch:qwen2-0.5b batch_size=16).")
            k, v = item.split("=", 1)
            items.append((k.strip(), v))
    opts = {k: d for k, (d, _, _) in OPTIONS.items()}
    for k, v in items:
        k = aliases.get(k, k)
        if k not in OPTIONS:
            raise DynatuneError(f"unknown estimate key '{k}'; valid keys are: {', '.join(OPTIONS)}.")
        parser = OPTIONS[k][1]
        if v is None:
            opts[k] = None
            continue
        try:
            opts[k] = _parse_bool(v) if parser is bool else parser(v)
        except (TypeError, ValueError):
            kind = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[parser]
            raise DynatuneError(f"bad value for '{k}': {v!r} is not {kind} ({OPTIONS[k][2]}).") from None
    o = SimpleNamespace(**opts)
    if not o.model:
        raise DynatuneError("estimate needs model=... (e.g. model=arch:qwen2-0.5b, model=smollm2-135m or a local "
                            "Hugging Face directory).")
    for k in ("batch_size", "seq_len", "grad_accum", "num_labels"):
        if getattr(o, k) < 1:
            raise DynatuneError(f"{k} must be at least 1, got {getattr(o, k)}.")
    if o.seq_len < 2:
        raise DynatuneError(f"seq_len must be at least 2, got {o.seq_len}.")
    if o.world_size < 1:
        raise DynatuneError(f"world_size must be at least 1, got {o.world_size}.")
    if o.strategy not in ("ddp", "fsdp"):
        raise DynatuneError(f"strategy must be ddp or fsdp, got '{o.strategy}'.")
    if o.batch_size % (o.grad_accum * o.world_size):
        raise DynatuneError(f"batch_size={o.batch_size} is not divisible by grad_accum={o.grad_accum}"
                            + (f" x world_size={o.world_size}." if o.world_size > 1 else "."))
    check_precision(o.precision)
    if o.device_type not in DEVICE_TYPES:
        raise DynatuneError(f"device_type must be cuda or cpu, got '{o.device_type}'.")
    if o.chunked_loss < 0:
        raise DynatuneError(f"chunked_loss must be 0 (off) or a number of tokens per chunk, got {o.chunked_loss}.")
    if o.chunked_loss:
        o.loss = "chunked"
    if o.loss not in LOSSES:
        raise DynatuneError(f"unknown loss '{o.loss}'; use one of {', '.join(LOSSES)}.")
    check_margin(o.margin)
    fams = [f.strip() for f in str(o.families).split(",") if f.strip()]
    bad = [f for f in fams if f not in FAMILIES]
    if bad or not fams:
        raise DynatuneError(f"unknown families {bad or o.families!r}; use a comma list of {', '.join(FAMILIES)}.")
    o.families_given = o.families != ",".join(FAMILIES)
    o.families = fams
    if o.dynalora_r < 1:
        raise DynatuneError(f"dynalora_r must be at least 1, got {o.dynalora_r}.")
    o.lora_ranks = _ranks(o.lora_ranks, "lora_ranks", "LoRA ranks")
    o.spsft_ranks = _ranks(o.spsft_ranks, "spsft_ranks", "SPSFT's rows per linear")
    if o.budget is not None:
        parse_budget(o.budget)
    return o


def _ranks(text, key: str, what: str) -> list[int]:
    try:
        ranks = [int(r) for r in str(text or "").split(",") if r.strip()]
    except ValueError:
        raise DynatuneError(f"{key} must be a comma list of ranks (e.g. 8,64), got {text!r}.") from None
    if any(r < 1 for r in ranks):
        raise DynatuneError(f"{what} must be at least 1, got {ranks}.")
    return ranks


def _kind(o, config) -> str:
    if o.kind != "auto":
        if o.kind not in ("causal-lm", "classification", "regression"):
            raise DynatuneError(f"unknown kind '{o.kind}'; use causal-lm, classification or regression.")
        return o.kind
    return "classification" if getattr(config, "model_type", "") in ENCODER_TYPES else "causal-lm"


def _lora_prepare(r: int, cap: bool):
    """dynatune's lora method (per-module cap) or plain peft all-linear (no cap, as the anchors ran it)."""
    if cap:
        return build_method("lora", LoraConfig(r=r, alpha=2.0 * r))

    def prepare(model):
        from peft import LoraConfig as PeftLora, inject_adapter_in_model
        return inject_adapter_in_model(PeftLora(r=r, lora_alpha=2 * r, target_modules=list(target_linears(
            model, "all-linear"))), model)

    return SimpleNamespace(prepare_model=prepare, granularity="adapter", config=SimpleNamespace(train_head=True))


def estimate(cfg_like) -> list[dict]:
    """Price every plan family; returns one dict per configuration (see the module docstring)."""
    o = parse_options(cfg_like)
    config = resolve_config(o.model)
    kind = _kind(o, config)
    micro = o.batch_size // o.world_size // o.grad_accum  # one rank's micro-batch
    kw = dict(precision=o.precision, optimizer=o.optimizer, device_type=o.device_type,
              world_size=o.world_size, strategy=o.strategy,
              batch_shape=(micro, o.seq_len), loss=o.loss, chunk_tokens=o.chunked_loss or 1024,
              grad_accum=o.grad_accum, hold_logits=o.hold_logits, gradient_checkpointing=o.gradient_checkpointing)
    if kind != "causal-lm" and o.loss != "hf":
        raise DynatuneError(f"loss={o.loss} needs a causal LM; {o.model} is set up as {kind}.")
    mm = MemoryModel.from_config(config, kind=kind, num_labels=o.num_labels, **kw)
    units = mm.units
    n = units.n_blocks
    fresh = {u.name for u in units.fresh_heads}
    top = {u.name for u in units.of_kind("norm", "pooler")}
    emb = {u.name for u in units.of_kind("embedding")}

    def blocks(lo, hi):
        return {f"block.{i}" for i in range(lo, hi)}

    rows: list[dict] = []

    def add(family, setting, name, model, plan):
        pred = model.predict(plan)
        row = {"config": name, "family": family, "setting": setting, **pred.to_dict(),
               "exit_depth": plan.exit_depth}
        rows.append(row)

    fams = o.families
    full_plan = Plan.of(u.name for u in units)
    add("full", 1, "full", mm, full_plan)  # always: a fraction budget is of its peak
    if "top" in fams:
        for k in range(1, n + 1):
            add("top", k, f"top{k}", mm, Plan.of(top | blocks(n - k, n) | fresh))
    if "bottom" in fams:
        for k in range(1, n + 1):
            add("bottom", k, f"bottom{k}", mm, Plan.of(blocks(0, k) | fresh))
    if "lisa" in fams and emb:
        for k in range(1, n + 1):  # which k blocks does not change the cost: all are on the path
            add("lisa", k, f"lisa{k}", mm, Plan.of(top | emb | blocks(n - k, n) | fresh))
    if "exit" in fams:
        for e in range(1, n):
            for k in sorted({1, max(1, n // 4), max(1, e // 2), e}):
                if k <= e:
                    add("exit", (e, k), f"exit{e}_top{k}", mm, Plan.of(blocks(e - k, e) | fresh, exit_depth=e))
    if "lora" in fams:
        cap = max(min(m.in_features, m.out_features) for m in target_linears(mm.model, "all-linear").values())
        ranks = o.lora_ranks or [2**i for i in range(cap.bit_length()) if 2**i <= cap]
        for r in ranks:
            method = _lora_prepare(r, o.lora_cap)
            lm = MemoryModel.from_config(config, kind=kind, num_labels=o.num_labels, method=method, **kw)
            add("lora", r, f"lora_r{r}", lm, Plan.of({u.name for u in lm.units.of_kind("adapter")}
                                                      | {u.name for u in lm.units.fresh_heads}))
    if "dynalora" in fams:
        try:
            method = build_method("dynalora", targets=o.dynalora_targets, r=o.dynalora_r)
            dm = MemoryModel.from_config(config, kind=kind, num_labels=o.num_labels, method=method, **kw)
        except DynatuneError:
            if o.families_given:  # asked for by name: say why it cannot be priced
                raise
            dm = None  # every family by default: a model without DynaLoRA's targets has no such rows
    if "dynalora" in fams and dm is not None:
        mods = dm.units.of_kind("adapter")
        heads = {u.name for u in dm.units.fresh_heads}
        size = {u.name: dm.param_bytes(u.param_names) for u in mods}
        M = len(mods)
        for k in sorted({max(1, round(M / 3)), max(1, round(2 * M / 3)), M}):
            lowest = min(mods, key=lambda u: (u.depth, -size[u.name], u.name))
            rest = sorted((u for u in mods if u is not lowest), key=lambda u: (-size[u.name], u.name))
            worst = [lowest, *rest[:k - 1]]
            highest = sorted(mods, key=lambda u: (-u.depth, -size[u.name], u.name))[:k]
            add("dynalora", k, f"dynalora_k{k}", dm, Plan.of({u.name for u in worst} | heads))
            add("dynalora-top", k, f"dynalora_k{k}_top", dm, Plan.of({u.name for u in highest} | heads))
    if "spsft" in fams:
        # row deltas on every linear of the blocks (FA: the MLP's); activations do not depend on r
        for r in o.spsft_ranks:
            method = build_method("spsft", r=r, freeze_attention=o.spsft_fa)
            sm = MemoryModel.from_config(config, kind=kind, num_labels=o.num_labels, method=method, **kw)
            add("spsft", r, f"spsft_r{r}" + ("_fa" if o.spsft_fa else ""), sm, method.largest_plan(sm.units))
    if "full" not in fams:
        rows = [r for r in rows if r["family"] != "full"] if o.budget is None else rows

    budget = None
    if o.budget is not None:
        full_peak = next(r["predicted_peak_bytes"] for r in rows if r["config"] == "full")
        budget = resolve_budget(o.budget, full_peak)
        limit = usable_budget(budget, o.margin)
        best: dict = {}
        for row in rows:
            row["fits"] = row["predicted_peak_bytes"] <= limit
            row["fits_best"] = False
            if row["fits"]:
                cur = best.get(row["family"])
                if cur is None or _size(row) > _size(cur):
                    best[row["family"]] = row
        for row in best.values():
            row["fits_best"] = True
        for row in rows:
            row["budget_bytes"] = budget
            row["usable_budget_bytes"] = limit
    for row in rows:
        row["setting"] = list(row["setting"]) if isinstance(row["setting"], tuple) else row["setting"]
        row.update(model=o.model, batch_size=o.batch_size, micro_batch=micro, seq_len=o.seq_len,
                   precision=o.precision, optimizer=o.optimizer, device_type=o.device_type, loss=o.loss)
    return rows


def _size(row):
    """How large a setting is within its family: k, rank; for exits the trained blocks, then the depth."""
    s = row["setting"]
    if isinstance(s, (tuple, list)):  # (e, k)
        return (s[1], s[0])
    return (s,)


def format_table(rows: list[dict]) -> str:
    head = rows[0]
    big = max(r["predicted_peak_bytes"] for r in rows) >= 2**30
    G, unit = (2**30, "GiB") if big else (2**20, "MiB")
    lines = [f"model {head['model']}  batch {head['batch_size']} (micro {head['micro_batch']}) x {head['seq_len']} "
             f"tokens  precision {head['precision']}  optimizer {head['optimizer']}  device {head['device_type']}  "
             f"loss {head['loss']}",
             f"attention: {head.get('attention_kernel', '')}"]
    if "budget_bytes" in head:
        lines.append(f"budget {fmt_bytes(head['budget_bytes'])} ({head['budget_bytes']} bytes), usable "
                     f"{fmt_bytes(head['usable_budget_bytes'])}; * = fits, ** = largest of its family that fits")
    cols = f"{'config':<16}{'train M':>9}{'weights':>9}{'grads':>8}{'optim':>8}{'acts':>8}{'base':>8}" \
           f"{'PEAK ' + unit:>10}{'counted':>9}  phase"
    lines += [cols, "-" * len(cols)]
    for r in rows:
        t = r["terms"]
        mark = ("**" if r.get("fits_best") else "*" if r.get("fits") else "") if "fits" in r else ""
        lines.append(f"{r['config']:<16}{r['trainable_params'] / 1e6:>9.2f}{t['weights'] / G:>9.2f}"
                     f"{t['gradients'] / G:>8.2f}{t['optimizer'] / G:>8.2f}{t['activations'] / G:>8.2f}"
                     f"{t['base'] / G:>8.2f}{r['predicted_peak_bytes'] / G:>10.2f}"
                     f"{r['predicted_counted_bytes'] / G:>9.2f}  {r['peak_phase']} {mark}")
    lines.append(f"{unit}; terms at the peak phase (base: outside the blocks' saved tensors, logits/loss transients, "
                 "optimizer scratch, cuBLAS workspaces); counted = weights + gradients + optimizer + saved activations")
    if "budget_bytes" in head and not any(r.get("fits") for r in rows):
        lines.append(f"nothing fits: the smallest plan needs {fmt_bytes(min(r['predicted_peak_bytes'] for r in rows))}"
                     f" / (1 - margin)")
    lines += summary(rows)
    return "\n".join(lines)


DEVICE_NOTE = {"cuda": "a CUDA device (the peak is torch.cuda.max_memory_allocated, allocator transients and cuBLAS "
                       "workspaces included); device_type=cpu prices a CPU run",
               "cpu": "the CPU (no cuBLAS workspaces; the peak is the largest phase, never below the counted "
                      "bytes); device_type=cuda prices a GPU run"}


def summary(rows: list[dict]) -> list[str]:
    """The table's last lines: which device it prices for, and what fits the budget per family."""
    head = rows[0]
    out = [f"priced for {DEVICE_NOTE[head['device_type']]}"]
    if "budget_bytes" not in head:
        return out + ["fits: no budget given; add budget=12GiB (or a fraction such as 0.6) to see what fits"]
    fams = {r["family"] for r in rows}
    best = {r["family"]: r for r in rows if r.get("fits_best")}
    n = max((r["setting"] for r in rows if r["family"] in ("top", "bottom", "lisa")), default=None)
    parts = []
    full = next(r for r in rows if r["config"] == "full")
    parts.append(f"full {'yes' if full.get('fits') else 'no'}")
    names = {"top": "top-k", "bottom": "bottom-k", "lisa": "LISA"}
    for fam in ("top", "bottom", "lisa"):
        if fam in fams:
            parts.append(f"{names[fam]} up to k={best[fam]['setting']} of {n}" if fam in best else f"{names[fam]} no")
    if "lora" in fams:
        parts.append(f"LoRA up to r={best['lora']['setting']}" if "lora" in best else "LoRA no")
    if "exit" in fams:
        parts.append("early exit up to depth e={0}, top k={1}".format(*best["exit"]["setting"]) if "exit" in best
                     else "early exit no")
    if "dynalora" in fams:
        m = max(r["setting"] for r in rows if r["family"] == "dynalora")
        if "dynalora" in best:
            parts.append(f"DynaLoRA up to k={best['dynalora']['setting']} of {m} anywhere")
        elif "dynalora-top" in best:
            parts.append(f"DynaLoRA up to k={best['dynalora-top']['setting']} of {m} in the top blocks")
        else:
            parts.append("DynaLoRA no")
    if "spsft" in fams:
        parts.append(f"SPSFT up to r={best['spsft']['setting']} rows per linear" if "spsft" in best else "SPSFT no")
    if "top" in fams:
        # TriMS starts from the top block alone (its start state) and grows within the budget
        top1 = next(r for r in rows if r["config"] == "top1")
        parts.append("TriMS yes" if top1.get("fits") else "TriMS no (its start, the top block, does not fit)")
    return out + [f"fits in {fmt_bytes(head['budget_bytes'])}: " + "; ".join(parts)]


def run_estimate(overrides: list[str], as_json: bool = False, out=None) -> int:
    """`dynatune estimate key=value ... [--json]`: print the table (or the JSON list); 0, or 2 on a user error."""
    out = out or sys.stdout
    try:
        rows = estimate(list(overrides))
    except DynatuneError as err:
        print(f"dynatune: error: {err}", file=sys.stderr)
        return 2
    if as_json:
        print(json.dumps(rows, indent=1), file=out)
    else:
        print(format_table(rows), file=out)
    return 0


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--json"]
    sys.exit(run_estimate(args, "--json" in sys.argv[1:]))
