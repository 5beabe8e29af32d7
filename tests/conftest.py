"""Shared fixtures: small models saved as local Hugging Face directories with real tokenizers.

They let the CLI run end to end on real data in seconds: the body is tiny, the tokenizer and
vocabulary are the real MiniLM / SmolLM2 ones (from the asset cache).
"""
import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices run fastest on one thread, and far faster on a busy machine (no OpenMP spinning)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _save_tiny(path, auto_name, tokenizer_dir, model_type, **cfg):
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.for_model(model_type, **cfg)
    torch.manual_seed(0)
    getattr(transformers, auto_name).from_config(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    from dynatune.assets import asset_path

    return _save_tiny(tmp_path_factory.mktemp("tiny-bert"), "AutoModel", asset_path("minilm-l6"), "bert",
                      vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, max_position_embeddings=128)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    from dynatune.assets import smollm2_hf_dir

    return _save_tiny(tmp_path_factory.mktemp("tiny-llama"), "AutoModelForCausalLM", smollm2_hf_dir(), "llama",
                      vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True)
