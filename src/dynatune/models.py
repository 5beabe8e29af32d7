"""Build the model and tokenizer a run fine-tunes: a cached pretrained model, a local HF folder,
or a randomly initialised model of a known architecture (`arch:NAME`).

Random-init models of real architectures serve memory and speed measurements (weight values do
not change either); the tiny ones serve tests.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch

from dynatune import assets
from dynatune.errors import DynatuneError
from .modules.row_delta import DELTAS_CONFIG, load_deltas

KINDS = ("classification", "regression", "causal-lm")
ENCODER_TYPES = {"bert", "roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2",
                 "xlm-roberta", "mpnet"}

_TINY_IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)  # inside a 1000-token vocab

ARCHS: dict[str, dict] = {
    # The two anchor architectures, exactly as in shared/anchors/anchors_gpu.py.
    "qwen2-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                       tie_word_embeddings=True, max_position_embeddings=4096),
    "llama-3.2-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                         tie_word_embeddings=True, max_position_embeddings=4096),
    # Matches the config transformers reads out of the SmolLM2 GGUF.
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152,
                         tie_word_embeddings=True, max_position_embeddings=8192, rope_theta=100000.0,
                         rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=2),
    # Matches all-MiniLM-L6-v2's config.json.
    "minilm-l6": dict(model_type="bert", hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                      intermediate_size=1536, vocab_size=30522, max_position_embeddings=512,
                      type_vocab_size=2, layer_norm_eps=1e-12, pad_token_id=0),
    # Tiny models for tests: seconds on a CPU, feed them token ids < 1000 directly.
    "tiny-llama": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=1000,
                       tie_word_embeddings=True, max_position_embeddings=256, **_TINY_IDS),
    "tiny-qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=1000,
                       tie_word_embeddings=True, max_position_embeddings=256, **_TINY_IDS),
    "tiny-bert": dict(model_type="bert", hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                      intermediate_size=128, vocab_size=1000, max_position_embeddings=256, pad_token_id=0),
    "tiny-gpt2": dict(model_type="gpt2", n_embd=64, n_layer=4, n_head=4, vocab_size=1000,
                      n_positions=256, **_TINY_IDS),
}


_TOKENIZER_VOCAB = {"minilm-l6": 30522, "smollm2-135m": 49152}


@dataclass(frozen=True)
class PretrainedModel:
    asset: str
    subdir: str
    description: str


MODELS: dict[str, PretrainedModel] = {
    "minilm-l6": PretrainedModel("minilm-l6", "", "all-MiniLM-L6-v2, BERT encoder, 22.7M params "
                                 "(classification, regression)"),
    "smollm2-135m": PretrainedModel("smollm2-135m", "hf", "SmolLM2-135M-Instruct, Llama decoder, "
                                    "134.5M params (all kinds)"),
}


def model_names() -> list[str]:
    return list(MODELS)


def arch_names() -> list[str]:
    return list(ARCHS)


def arch_config(name: str):
    """A transformers config for the built-in architecture `name` (attention: sdpa)."""
    from transformers import AutoConfig

    if name not in ARCHS:
        raise DynatuneError(f"unknown architecture {name!r}; known archs are: {', '.join(ARCHS)}.")
    kw = dict(ARCHS[name])
    cfg = AutoConfig.for_model(kw.pop("model_type"), **kw)
    return cfg


def resolve_config(config):
    """A transformers config from a config object, 'arch:NAME' / NAME of ARCHS, a known
    pretrained model name, or a local Hugging Face directory."""
    if not isinstance(config, str):
        return copy.deepcopy(config)
    name = config[len("arch:"):] if config.startswith("arch:") else config
    if name in ARCHS:
        return arch_config(name)
    from transformers import AutoConfig

    if config in MODELS:
        return AutoConfig.from_pretrained(_resolve_dir(config))
    p = Path(config).expanduser()
    if p.is_dir() and (p / "config.json").is_file():
        return AutoConfig.from_pretrained(p)
    raise DynatuneError(f"unknown model {config!r}; use arch:NAME with NAME in {', '.join(ARCHS)}, "
                        f"one of {', '.join(MODELS)}, or a local Hugging Face model directory.")


def meta_model(config, *, kind: str = "causal-lm", precision: str = "fp32", num_labels: int | None = None):
    """The full-size model on the meta device: exact shapes and dtypes, no memory, no init time."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cfg = resolve_config(config)
    if kind != "causal-lm":
        cfg.num_labels = 1 if kind == "regression" else (num_labels or getattr(cfg, "num_labels", 2) or 2)
        if kind == "regression":
            cfg.problem_type = "regression"
    _set_special_ids(cfg, None)
    auto = AutoModelForCausalLM if kind == "causal-lm" else AutoModelForSequenceClassification
    last = None
    for attn in ("sdpa", "eager"):
        try:
            with torch.device("meta"):
                m = auto.from_config(cfg, attn_implementation=attn)
            break
        except ValueError as e:
            last = e
    else:
        raise last
    if precision == "bf16":
        m.to(torch.bfloat16)
    m.train()
    return m


def load_model(spec: str, kind: str, num_labels: int | None = None, dtype=torch.float32, seed: int = 0,
               tokenizer_only: bool = False, label_names: list[str] | None = None, saved: bool = False):
    """Return (model, tokenizer) for `spec` set up for `kind`.

    spec: a name from model_names(), a local Hugging Face model directory, or `arch:NAME`.
    kind: "classification" (needs num_labels), "regression" (one output) or "causal-lm".
    The tokenizer is None for arch models whose vocabulary is smaller than any real tokenizer
    (tiny-*), or whose tokenizer asset is not cached; such models take token ids directly.
    tokenizer_only=True returns (None, tokenizer) without building the model (to load the task
    first and learn num_labels). label_names: the classes, saved with the model as id2label.
    saved=True: spec is a finished run's model/ (`dynatune eval`): a peft adapter there loads onto
    the base model it names (a PeftModel), and no weight may be missing from the directory.
    """
    from .modules.bottleneck import is_bottleneck_dir
    if saved and is_bottleneck_dir(spec):  # IST's series/parallel adapters on the base model they name
        return _load_bottleneck(Path(str(spec)).expanduser(), kind, num_labels, dtype, seed, tokenizer_only,
                                label_names)
    adapter = _adapter_dir(spec)
    if adapter is not None:
        if not saved:
            raise DynatuneError(f"{adapter} holds a peft adapter, and training on from one is not supported (a method "
                                "that updates base weights would lose them when the adapter is saved); train from its "
                                "base model, or from the merged model a run saves with save_merged=true.")
        return _load_adapter(adapter, kind, num_labels, dtype, seed, tokenizer_only, label_names)
    deltas = Path(str(spec)).expanduser()
    if (deltas / DELTAS_CONFIG).is_file():
        if not saved:
            raise DynatuneError(f"{deltas} holds SPSFT row deltas, not a model to train from; train from its base "
                                "model, or from the merged model a run saves with save_merged=true.")
        return _load_deltas(deltas, kind, num_labels, dtype, seed, tokenizer_only, label_names)
    model, tokenizer, fresh = _load(spec, kind, num_labels, dtype, seed, tokenizer_only, label_names)
    if saved and fresh:
        raise DynatuneError(f"{spec} lacks {len(fresh)} weights of its model (e.g. {sorted(fresh)[0]}), which "
                            "would be freshly initialised; it was not saved by save_pretrained from this model.")
    return model, tokenizer


def _load(spec, kind, num_labels, dtype, seed, tokenizer_only, label_names):
    """load_model's (model, tokenizer), and the names of the weights the directory lacks (fresh)."""
    if kind not in KINDS:
        raise DynatuneError(f"unknown model kind {kind!r}; use one of: {', '.join(KINDS)}.")
    if kind == "classification" and not tokenizer_only and (num_labels is None or num_labels < 2):
        raise DynatuneError(f"a classification model needs num_labels >= 2 (got {num_labels}).")
    if kind == "regression":
        num_labels = 1
    spec = str(spec)

    if spec.startswith("arch:"):
        config = arch_config(spec[len("arch:"):])
        tokenizer = _borrowed_tokenizer(config)
        source = None
    else:
        source = _resolve_dir(spec)
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(source)
        tokenizer = _load_tokenizer(source)

    if kind == "causal-lm" and config.model_type in ENCODER_TYPES:
        raise DynatuneError(f"{spec} is an encoder-only ({config.model_type}) model and cannot be "
                            "trained as a causal LM; use a decoder such as smollm2-135m.")
    if tokenizer is not None:
        if tokenizer.pad_token is None:  # decoders often ship without one; eos is the usual stand-in
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "right"
    _set_special_ids(config, tokenizer)
    if tokenizer_only:
        return None, tokenizer, set()
    if kind != "causal-lm":
        config.num_labels = num_labels
        config.problem_type = "regression" if kind == "regression" else "single_label_classification"
    if label_names is not None:
        config.id2label = dict(enumerate(label_names))
        config.label2id = {name: i for i, name in enumerate(label_names)}

    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForCausalLM if kind == "causal-lm" else AutoModelForSequenceClassification
    # Fork the RNG so a seeded build neither depends on nor disturbs the caller's random state.
    with torch.random.fork_rng(devices=[]), assets.quiet_transformers():
        torch.manual_seed(seed)
        model, fresh = _build(auto, config, source, dtype)
    if source is None:
        model.name_or_path = spec  # the base an adapter names: rebuilt by dynatune from the same seed
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = config.pad_token_id
    return model, tokenizer, fresh


def _adapter_dir(spec: str) -> Path | None:
    path = Path(str(spec)).expanduser()
    return path if (path / "adapter_config.json").is_file() else None


def _load_adapter(path: Path, kind, num_labels, dtype, seed, tokenizer_only, label_names):
    """A peft adapter directory: the base model it names (an arch: base from `seed`), then the adapter."""
    import json

    config = json.loads((path / "adapter_config.json").read_text())
    base = config.get("base_model_name_or_path") or ""
    if not (base.startswith("arch:") or base in MODELS or (Path(base).expanduser() / "config.json").is_file()):
        raise DynatuneError(f"{path} holds a peft adapter whose base model {base!r} cannot be found; restore that "
                            "model there (or set base_model_name_or_path in its adapter_config.json).")
    model, tokenizer, fresh = _load(base, kind, num_labels, dtype, seed, tokenizer_only, label_names)
    if tokenizer_only:
        return None, tokenizer
    # what the base lacks (a fresh task head) the adapter must carry, as modules_to_save
    saved_heads = tuple(config.get("modules_to_save") or ())
    lost = sorted(k for k in fresh if not k.startswith(tuple(f"{m}." for m in saved_heads)))
    if lost:
        raise DynatuneError(f"{path} holds a peft adapter without {lost[0]} (its base model has none, and peft "
                            "would initialise it afresh), so it cannot reproduce the run it came from.")
    from peft import PeftModel

    with assets.quiet_transformers():
        # adapters in the base model's dtype, as dynatune's methods create them (a bf16 run's are bf16)
        return PeftModel.from_pretrained(model, path, autocast_adapter_dtype=False), tokenizer


def _base_then(path: Path, config_file: str, what: str, heads_of, load, kind, num_labels, dtype, seed,
               tokenizer_only, label_names):
    """A saved directory of weights that sit on a base model (IST's bottleneck adapters, SPSFT's row
    deltas): the base model its config names (an arch: base from `seed`), then `load(model, path)`.
    Every weight the base lacks must be a head the directory holds."""
    import json

    config = json.loads((path / config_file).read_text())
    base = config.get("base_model_name_or_path") or ""
    if not (base.startswith("arch:") or base in MODELS or (Path(base).expanduser() / "config.json").is_file()):
        raise DynatuneError(f"{path} holds {what} whose base model {base!r} cannot be found; restore that model "
                            f"there (or set base_model_name_or_path in its {config_file}).")
    model, tokenizer, fresh = _load(base, kind, num_labels, dtype, seed, tokenizer_only, label_names)
    if tokenizer_only:
        return None, tokenizer
    lost = sorted(k for k in fresh if not heads_of(config, k))
    if lost:
        raise DynatuneError(f"{path} holds {what} without {lost[0]} (its base model has none), so it cannot "
                            "reproduce the run it came from.")
    return load(model, path), tokenizer


def _load_bottleneck(path: Path, *args):
    """A bottleneck adapter directory (modules/bottleneck.py): its base model, then the adapters and head."""
    from .modules.bottleneck import CONFIG_FILE, load_bottleneck
    return _base_then(path, CONFIG_FILE, "bottleneck adapters",
                      lambda cfg, k: k.startswith(tuple(f"{h}." for h in cfg.get("head") or ())),
                      load_bottleneck, *args)


def _load_deltas(path: Path, *args):
    """An SPSFT deltas export: the base model it names, then its row deltas."""
    return _base_then(path, DELTAS_CONFIG, "SPSFT deltas", lambda cfg, k: k in set(cfg.get("heads", ())),
                      load_deltas, *args)


def _build(auto, config, source, dtype):
    """(model, names of the weights freshly initialised because the directory lacks them)."""
    last = None
    for attn in ("sdpa", "eager"):  # eager only for architectures without an sdpa kernel
        try:
            if source is None:
                return auto.from_config(config, dtype=dtype, attn_implementation=attn), set()
            model, info = auto.from_pretrained(source, config=config, dtype=dtype, attn_implementation=attn,
                                               output_loading_info=True)
            return model, set(info["missing_keys"]) | set(info["unexpected_keys"])
        except ValueError as e:
            if "sdpa" not in str(e).lower() and "attention" not in str(e).lower():
                raise
            last = e
    raise last


def _resolve_dir(spec: str) -> Path:
    if spec in MODELS:
        m = MODELS[spec]
        path = assets.asset_path(m.asset)
        return path / m.subdir if m.subdir else path
    path = Path(spec).expanduser().resolve()  # absolute: an adapter names its base by this path
    if spec.strip() and path.is_dir():
        if not (path / "config.json").is_file():
            raise DynatuneError(f"{path} has no config.json; a local model must be a Hugging Face "
                                "model directory (written by save_pretrained).")
        return path
    raise DynatuneError(
        f"unknown model {spec!r}; use one of {', '.join(MODELS)}, `arch:NAME` with NAME in "
        f"{', '.join(ARCHS)}, or the path of a local Hugging Face model directory.")


def _load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        with assets.quiet_transformers():
            return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError):
        return None  # a weights-only folder; tasks then say a tokenizer is needed


def _borrowed_tokenizer(config):
    """Real tokenizer for a random-init arch: MiniLM's for encoders, SmolLM2's for decoders."""
    name = "minilm-l6" if config.model_type in ENCODER_TYPES else "smollm2-135m"
    # Skip the load (~0.5 s) when the vocabulary is known to be too small (tiny-* test archs).
    if config.vocab_size < _TOKENIZER_VOCAB[name] or not assets.is_cached(name):
        return None
    tok = _load_tokenizer(_resolve_dir(name))
    # A tokenizer whose ids reach past the embedding table would index out of range.
    if tok is None or len(tok) > config.vocab_size:
        return None
    return tok


def _set_special_ids(config, tokenizer) -> None:
    if tokenizer is not None:
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(tokenizer, key, None)
            if value is not None:
                setattr(config, key, value)
    if getattr(config, "pad_token_id", None) is None:
        # Decoder classification heads pick the last non-pad token: they need a pad id.
        eos = getattr(config, "eos_token_id", None)
        config.pad_token_id = eos if isinstance(eos, int) else 0
