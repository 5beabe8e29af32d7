"""The plain loop with `full` is plain fine-tuning, bit for bit."""
import torch

from dynatune.loop import epoch_order, fit, linear_schedule
from dynatune.methods import build_method

from tiny import causal_lm, classifier, cls_examples, collate, lm_examples, loop_cfg


def reference_loop(model, data, cfg, steps):
    """What a user would write by hand: AdamW over every parameter, same schedule and order."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = linear_schedule(opt, int(cfg.warmup_ratio * steps), steps)
    order = epoch_order(len(data), cfg.seed, 0)
    losses = []
    for s in range(steps):
        idx = order[s * cfg.batch_size:(s + 1) * cfg.batch_size]
        loss = model(**collate([data[i] for i in idx])).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], cfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def run_fit(model, data, cfg):
    tuner, state = fit(model, build_method("full"), data, collate, cfg)
    return [h["loss"] for h in tuner.history], tuner


def test_full_equals_reference_loop_causal_lm():
    cfg = loop_cfg()
    data = lm_examples()
    ref_model, our_model = causal_lm(), causal_lm()
    ref_losses = reference_loop(ref_model, data, cfg, 5)
    our_losses, _ = run_fit(our_model, data, cfg)
    assert our_losses == ref_losses
    for (n, a), (_, b) in zip(ref_model.named_parameters(), our_model.named_parameters()):
        assert torch.equal(a, b), n


def test_full_equals_reference_loop_classifier_with_dropout():
    cfg = loop_cfg()
    data = cls_examples()
    ref_model, our_model = classifier(hidden_dropout_prob=0.1), classifier(hidden_dropout_prob=0.1)
    torch.manual_seed(5)
    ref_losses = reference_loop(ref_model, data, cfg, 5)
    torch.manual_seed(5)
    our_losses, _ = run_fit(our_model, data, cfg)
    assert our_losses == ref_losses
    for (n, a), (_, b) in zip(ref_model.named_parameters(), our_model.named_parameters()):
        assert torch.equal(a, b), n


def test_grad_accum_matches_one_big_batch():
    data = lm_examples()
    a, _ = run_fit(causal_lm(), data, loop_cfg(grad_accum=1))
    b, _ = run_fit(causal_lm(), data, loop_cfg(grad_accum=2))
    assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5)
