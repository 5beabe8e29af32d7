"""Units: the named, selectable pieces of a model.

A unit is identified by parameter *names* (never tensor ids), so plans, optimizer state and
method state survive a reload, a peft wrap or a resume. `partition(model, granularity)` finds
the units of Llama/Qwen2/Mistral/Gemma-style decoders, GPT-2 and BERT/RoBERTa encoders, with
or without peft adapters.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from torch import nn

from .errors import DynatuneError

# Where the transformer blocks live, tried in order (peft wraps add "base_model.model." in front).
BLOCK_PATHS = (
    "model.layers",            # Llama, Qwen2, Mistral, Gemma (CausalLM / SequenceClassification)
    "model.language_model.layers",
    "transformer.h",           # GPT-2
    "bert.encoder.layer",      # BERT
    "roberta.encoder.layer",   # RoBERTa
    "encoder.layer",           # bare BertModel / RobertaModel
    "layers",                  # bare LlamaModel
    "h",                       # bare GPT2Model
)
# Freshly initialised task heads: no pretrained values to keep, so they always train by default.
FRESH_HEAD_NAMES = ("classifier", "score", "qa_outputs")
GRANULARITIES = ("block", "module", "adapter")
KINDS = ("embedding", "block", "module", "adapter", "norm", "pooler", "head")


@dataclass(frozen=True)
class Unit:
    """A selectable piece: `depth` is the block index (-1 below the blocks, n_blocks above)."""

    name: str
    kind: str
    depth: int
    param_names: tuple[str, ...]
    fresh: bool = False  # a task head with no pretrained values

    def __repr__(self) -> str:  # short: units are printed in plans and logs
        return f"Unit({self.name}, {self.kind}, depth={self.depth}, params={len(self.param_names)})"


@dataclass
class Units:
    """All units of one model, plus where its block list lives (for early exit)."""

    units: list[Unit]
    blocks_path: str
    n_blocks: int
    granularity: str
    tied_embedding: bool = False
    by_name: dict[str, Unit] = field(init=False)

    def __post_init__(self):
        self.by_name = {u.name: u for u in self.units}

    def __iter__(self):
        return iter(self.units)

    def __len__(self):
        return len(self.units)

    def __getitem__(self, name: str) -> Unit:
        try:
            return self.by_name[name]
        except KeyError:
            raise DynatuneError(f"unknown unit '{name}'; units are: {', '.join(self.by_name)}") from None

    def of_kind(self, *kinds: str) -> list[Unit]:
        return [u for u in self.units if u.kind in kinds]

    @property
    def blocks(self) -> list[Unit]:
        """Units that sit inside block i, ordered by depth (one per block at block granularity)."""
        return sorted((u for u in self.units if 0 <= u.depth < self.n_blocks), key=lambda u: u.depth)

    def block_names(self) -> list[str]:
        return [f"block.{i}" for i in range(self.n_blocks)]

    def in_block(self, i: int) -> list[Unit]:
        return [u for u in self.units if u.depth == i and u.kind in ("block", "module", "adapter")]

    @property
    def fresh_heads(self) -> list[Unit]:
        return [u for u in self.units if u.fresh]

    def param_names(self, names: Iterable[str]) -> list[str]:
        out: list[str] = []
        for n in names:
            out.extend(self[n].param_names)
        return out

    def unit_of_param(self) -> dict[str, str]:
        return {p: u.name for u in self.units for p in u.param_names}


def unit_sort_key(name: str):
    """Units in model order for plots and tables: embedding, block.0 (and its modules), ..., norm, head."""
    order = {"embedding": (-1, 0), "norm": (10**6, 0), "pooler": (10**6, 1), "head": (10**6 + 1, 0)}
    if name in order:
        return order[name]
    parts = name.split(".")
    return (int(parts[1]), 0 if len(parts) == 2 else 1, name) if len(parts) > 1 and parts[1].isdigit() else (0, name)


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The model a peft wrapper (PeftModel) wraps; any other model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def already_adapted(model: nn.Module) -> bool:
    """Whether `model` carries peft adapters (a PeftModel, injected in place, or loaded by transformers)."""
    return hasattr(model, "peft_config") or any("lora_" in n or "vera_" in n for n, _ in model.named_parameters())


def get_submodule(model: nn.Module, path: str) -> nn.Module | None:
    mod = model
    for part in path.split("."):
        if not hasattr(mod, part):
            return None
        mod = getattr(mod, part)
    return mod


def find_blocks_path(model: nn.Module, layers: str | None = None) -> str:
    """The dotted path of the ModuleList of transformer blocks."""
    if layers:
        mod = get_submodule(model, layers)
        if not isinstance(mod, nn.ModuleList):
            raise DynatuneError(f"layers='{layers}' is not a ModuleList of blocks in {type(model).__name__}; "
                                "pass the dotted path of the block list, e.g. layers='model.layers'.")
        return layers
    prefixes = [""]
    # peft: PeftModel.base_model (LoraModel).model is the wrapped transformers model
    if get_submodule(model, "base_model.model") is not None and hasattr(model, "peft_config"):
        prefixes = ["base_model.model.", ""]
    for pre in prefixes:
        for path in BLOCK_PATHS:
            mod = get_submodule(model, pre + path)
            if isinstance(mod, nn.ModuleList) and len(mod) > 0:
                return pre + path
    raise DynatuneError(
        f"dynatune does not know where the transformer blocks of {type(model).__name__} are; "
        "pass the dotted path of its block list, e.g. layers='transformer.h'.")


def _is_adapter_param(name: str) -> bool:
    return any(t in name for t in ("lora_", "vera_", "adapter", "ia3_", "oft_", "boft_", "shira_", "spsft_"))


def _adapter_owner(name: str) -> str:
    """'...q_proj.lora_A.default.weight' -> '...q_proj' (the module the adapter is attached to)."""
    parts = name.split(".")
    for i, p in enumerate(parts):
        if _is_adapter_param(p):
            return ".".join(parts[:i])
    return name.rsplit(".", 1)[0]


def partition(model: nn.Module, granularity: str = "block", layers: str | None = None) -> Units:
    """Split `model` into units.

    block: embedding, one unit per block, final norm, pooler, head.
    module: embedding, one unit per linear/norm module inside each block, final norm, pooler, head.
    adapter: one unit per adapted module's adapter parameters (peft), plus the fresh head;
             base weights are not units (they never train under an adapter method).
    """
    if granularity not in GRANULARITIES:
        raise DynatuneError(f"unknown granularity '{granularity}'; use one of {', '.join(GRANULARITIES)}.")
    blocks_path = find_blocks_path(model, layers)
    blocks = get_submodule(model, blocks_path)
    n = len(blocks)
    names = [name for name, _ in model.named_parameters()]  # skips tied duplicates

    in_block: dict[int, list[str]] = {i: [] for i in range(n)}
    outside: list[str] = []
    for name in names:
        if name.startswith(blocks_path + "."):
            idx = int(name[len(blocks_path) + 1:].split(".", 1)[0])
            in_block[idx].append(name)
        else:
            outside.append(name)

    head_mod = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    in_emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = head_mod is not None and in_emb is not None and head_mod.weight is in_emb.weight

    # lookup tables are embeddings whatever their attribute is called (models passed with layers=)
    embedding_params = {f"{m}.{p}" if m else p for m, mod in model.named_modules() if isinstance(mod, nn.Embedding)
                        for p, _ in mod.named_parameters(recurse=False)}
    groups: dict[str, list[str]] = {"embedding": [], "norm": [], "pooler": [], "head": [], "adapter-head": []}
    fresh_head = False
    for name in outside:
        leaf = name.split(".")
        if granularity == "adapter" and "original_module" in leaf:
            continue  # peft modules_to_save: the frozen original is never used in forward, never trains
        if _is_adapter_param(name):
            groups["adapter-head"].append(name)
        elif any(part in FRESH_HEAD_NAMES for part in leaf):
            groups["head"].append(name)
            fresh_head = True
        elif "lm_head" in leaf or ("pred" in name and "cls" in leaf):
            groups["head"].append(name)
        elif "pooler" in leaf:
            groups["pooler"].append(name)
        elif name in embedding_params or any(("embed" in part or part in ("wte", "wpe")) for part in leaf):
            groups["embedding"].append(name)
        elif "modules_to_save" in name:
            groups["head"].append(name)
        else:
            groups["norm"].append(name)

    units: list[Unit] = []

    def add(uname, kind, depth, params, fresh=False):
        if params:
            units.append(Unit(uname, kind, depth, tuple(params), fresh))

    if granularity != "adapter":
        add("embedding", "embedding", -1, groups["embedding"])
    for i in range(n):
        params = in_block[i]
        if granularity == "block":
            add(f"block.{i}", "block", i, params)
        elif granularity == "module":
            by_mod: dict[str, list[str]] = {}
            for p in params:
                by_mod.setdefault(p[len(blocks_path) + 1:].rsplit(".", 1)[0], []).append(p)
            for mod, ps in by_mod.items():
                add(f"block.{mod}", "module", i, ps)
        else:
            by_owner: dict[str, list[str]] = {}
            for p in params:
                if _is_adapter_param(p):
                    by_owner.setdefault(_adapter_owner(p[len(blocks_path) + 1:]), []).append(p)
            for owner, ps in by_owner.items():
                add(f"block.{owner}", "adapter", i, ps)
    if granularity != "adapter":
        add("norm", "norm", n, groups["norm"])
        add("pooler", "pooler", n, groups["pooler"])
    add("head", "head", n + 1, groups["head"] + groups["adapter-head"], fresh=fresh_head)
    if not any(u.depth >= 0 and u.depth < n for u in units):
        raise DynatuneError(f"no trainable units found inside the blocks of {type(model).__name__} at "
                            f"granularity '{granularity}'" + (" (is the model wrapped with a peft adapter?)"
                                                              if granularity == "adapter" else "") + ".")
    return Units(units, blocks_path, n, granularity, tied_embedding=tied)

