"""Early exit at e: blocks 0..e-1, then the final norm and the task head; it saves, reloads,
evaluates and generates as an e-block model, and Tuner.close() restores the full model."""
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from scripted import plan, snapshot, step, tuner
from tiny import causal_lm, classifier, cls_examples, collate, lm_examples

E = 2


def llama_by_hand(model, blocks, ids):
    """Embeddings, rotary position embeddings, the given blocks (causal), final norm, LM head."""
    base = model.model
    h = base.embed_tokens(ids)
    pos = torch.arange(ids.shape[1])[None]
    pe = base.rotary_emb(h, pos)
    for blk in blocks:
        out = blk(h, position_embeddings=pe, attention_mask=None, position_ids=pos)
        h = out[0] if isinstance(out, tuple) else out
    return model.lm_head(base.norm(h))


def bert_by_hand(model, blocks, ids):
    """Embeddings, encoder layers (no padding: no mask), pooler, classifier."""
    h = model.bert.embeddings(input_ids=ids)
    for layer in blocks:
        out = layer(h)
        h = out[0] if isinstance(out, tuple) else out
    return model.classifier(model.bert.pooler(h))


def lm_batch(seed=1):
    return collate(lm_examples(4, seed=seed))


def test_llama_exit_equals_blocks_by_hand_train_and_eval():
    model = causal_lm("llama")
    all_blocks = list(model.model.layers)
    b = lm_batch()
    with torch.no_grad():
        full = model(input_ids=b["input_ids"]).logits
    t = tuner(model, plan("block.1", "norm", exit_depth=E))
    t.begin_step()
    assert len(model.model.layers) == E and model.config.num_hidden_layers == E
    out = model(**b)
    expected = llama_by_hand(model, all_blocks[:E], b["input_ids"])
    torch.testing.assert_close(out.logits, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out.logits, full, atol=1e-3)  # the exit really changed the model
    loss = F.cross_entropy(expected[:, :-1].reshape(-1, expected.size(-1)), b["labels"][:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, loss)
    out.loss.backward()
    t.after_backward()
    t.abort_step()

    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=b["input_ids"]).logits,
                                   llama_by_hand(model, all_blocks[:E], b["input_ids"]), rtol=1e-5, atol=1e-5)


def test_llama_generate_after_exit_matches_greedy_by_hand():
    model = causal_lm("llama")
    all_blocks = list(model.model.layers)
    t = tuner(model, plan("block.0", exit_depth=E))
    step(t, lm_batch())
    model.eval()
    prompt = lm_batch(seed=3)["input_ids"][:1, :5]
    with torch.no_grad():
        gen = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=3, do_sample=False,
                             pad_token_id=0)
        assert gen.shape == (1, 8)
        seq = prompt
        for _ in range(3):  # greedy decoding with no cache, blocks run by hand
            nxt = llama_by_hand(model, all_blocks[:E], seq)[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert torch.equal(gen, seq)


def test_llama_save_after_exit_reloads_with_e_blocks(tmp_path):
    model = causal_lm("llama")
    t = tuner(model, plan("block.1", "norm", exit_depth=E))
    for s in (1, 2):
        step(t, lm_batch(s))
    t.close_hooks()  # the exit stays in place
    model.eval()
    ids = lm_batch(5)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert len(loaded.model.layers) == E and loaded.config.num_hidden_layers == E
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight or torch.equal(
        loaded.lm_head.weight, loaded.model.embed_tokens.weight)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, logits, rtol=0, atol=0)


def test_bert_classifier_exit_equals_layers_by_hand_and_reloads(tmp_path):
    model = classifier("bert")
    all_layers = list(model.bert.encoder.layer)
    data = cls_examples(8)
    t = tuner(model, plan("block.1", "pooler", "head", exit_depth=E))
    for k in range(2):
        step(t, collate(data[4 * k:4 * k + 4]))
    model.eval()
    ids = collate(data[:4])["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        torch.testing.assert_close(logits, bert_by_hand(model, all_layers[:E], ids), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(logits, bert_by_hand(model, all_layers, ids), atol=1e-4)
    t.close_hooks()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert len(loaded.bert.encoder.layer) == E and loaded.config.num_hidden_layers == E
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=torch.ones_like(ids)).logits, logits,
                                   rtol=0, atol=0)


def test_exit_changes_between_steps_and_close_restores_everything():
    model = causal_lm("llama")
    blocks = model.model.layers
    ids = lm_batch(5)["input_ids"]
    model.eval()
    with torch.no_grad():
        full = model(input_ids=ids).logits
    before = snapshot(model)
    t = tuner(model, [plan("block.0", exit_depth=1), plan("block.0"), plan("block.1", exit_depth=3),
                      plan("block.2", exit_depth=3)], lr=0.0)  # lr 0: weights stay, structure changes
    lengths = []
    model.train()
    for s in range(4):
        step(t, lm_batch(s + 1), inspect=lambda t: lengths.append((len(t.model.model.layers),
                                                                    t.model.config.num_hidden_layers)))
    assert lengths == [(1, 1), (4, 4), (3, 3), (3, 3)]
    t.close()
    assert model.model.layers is blocks and len(model.model.layers) == 4 and model.config.num_hidden_layers == 4
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, full, rtol=0, atol=0)
    # no hooks are left behind
    assert all(not b._forward_hooks and not b._forward_pre_hooks for b in blocks)


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_exit_other_decoders(arch):
    model = causal_lm(arch)
    t = tuner(model, plan("block.0", exit_depth=1))
    calls = []
    blocks = list(t.block_stack.full)
    hs = [b.register_forward_pre_hook(lambda m, a, i=i: calls.append(i)) for i, b in enumerate(blocks)]
    step(t, lm_batch())
    assert calls == [0]
    model.eval()
    with torch.no_grad():
        out = model.generate(lm_batch()["input_ids"][:1, :4], max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 6)
    for h in hs:
        h.remove()
    t.close()
    assert len(t.block_stack.full) == 4 and model.config.num_hidden_layers == 4
