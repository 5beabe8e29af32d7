"""Tiny models built from configs and toy batches: fast, deterministic test fixtures."""
from types import SimpleNamespace

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

VOCAB = 97

CONFIGS = {
    "llama": dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB, tie_word_embeddings=True,
                  max_position_embeddings=64),
    "qwen2": dict(model_type="qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB, tie_word_embeddings=False,
                  max_position_embeddings=64),
    "gpt2": dict(model_type="gpt2", n_embd=32, n_layer=4, n_head=4, vocab_size=VOCAB, n_positions=64),
    "bert": dict(model_type="bert", hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                 num_attention_heads=4, vocab_size=VOCAB, max_position_embeddings=64),
}


def config(arch, **kw):
    c = dict(CONFIGS[arch])
    c.update(kw)
    return AutoConfig.for_model(c.pop("model_type"), **c)


def causal_lm(arch="llama", seed=0, **kw):
    torch.manual_seed(seed)
    cfg = config(arch, **kw)
    cfg.pad_token_id = 0
    return AutoModelForCausalLM.from_config(cfg)


def classifier(arch="bert", num_labels=3, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = config(arch, num_labels=num_labels, **kw)
    cfg.pad_token_id = 0
    return AutoModelForSequenceClassification.from_config(cfg)


def lm_examples(n=40, seq=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, seq), generator=g)
    return [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r.clone()} for r in ids]


def cls_examples(n=40, seq=12, num_labels=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, seq), generator=g)
    labels = torch.randint(0, num_labels, (n,), generator=g)
    return [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": y} for r, y in zip(ids, labels)]


def collate(examples):
    return {k: torch.stack([e[k] for e in examples]) for k in examples[0]}


def loop_cfg(**kw):
    base = dict(batch_size=4, grad_accum=1, epochs=1.0, max_steps=5, lr=1e-3, weight_decay=0.0, warmup_ratio=0.2,
                grad_clip=1.0, precision="fp32", seed=0, log_every=1, checkpoint_every=0, keep_checkpoints=2,
                progress=False, eval_each_epoch=False, resume=None, layers=None)
    base.update(kw)
    return SimpleNamespace(**base)
