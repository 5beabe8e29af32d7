"""Chat-format data (each example a list of {role, content} messages) as supervised fine-tuning.

A conversation is rendered with the tokenizer's own chat template and tokenised once; the loss
falls on the assistant turns only. An assistant turn is what the template adds for that message
after the generation prompt (`add_generation_prompt=True`) of the conversation before it: its
content and the template's end-of-turn marker. Spans are found on the rendered text (each
prefix of the conversation renders to a prefix of the whole) and mapped to tokens through the
tokenizer's character offsets, so a token boundary across two turns cannot shift a label.
"""
from __future__ import annotations

from dynatune.errors import DynatuneError

ROLES = ("system", "user", "assistant", "tool")


def check_messages(turns, where: str) -> list[dict]:
    """A conversation as the chat template expects it, or one sentence saying what is wrong."""
    if not isinstance(turns, list) or not turns:
        raise DynatuneError(f"{where} is not a list of messages; each example needs a non-empty list of "
                            '{"role": ..., "content": ...} objects.')
    out = []
    for j, t in enumerate(turns):
        if not isinstance(t, dict) or "role" not in t or "content" not in t:
            raise DynatuneError(f"message {j + 1} of {where} is not a {{role, content}} object: {str(t)[:80]}.")
        if t["role"] not in ROLES:
            raise DynatuneError(f"message {j + 1} of {where} has role {t['role']!r}; use one of {', '.join(ROLES)}.")
        out.append({"role": t["role"], "content": "" if t["content"] is None else str(t["content"])})
    if not any(t["role"] == "assistant" for t in out):
        raise DynatuneError(f"{where} has no assistant message, so it has nothing to train on; every conversation "
                            "needs at least one.")
    return out


def _render(tokenizer, messages, generation_prompt=False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_spans(tokenizer, messages: list[dict], where: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns."""
    text = _render(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(_render(tokenizer, messages[:i], generation_prompt=True)) if i else 0
        upto = _render(tokenizer, messages[:i + 1])
        if not text.startswith(upto) or start > len(upto):
            raise DynatuneError(f"the tokenizer's chat template does not render {where} turn by turn (the "
                                f"conversation up to message {i + 1} is not a prefix of the whole), so its assistant "
                                "tokens cannot be told apart; use a model whose chat template appends one message at "
                                "a time.")
        spans.append((start, len(upto)))
    return text, spans


def encode_chat(tokenizer, messages: list[dict], max_length: int, where: str) -> dict:
    """input_ids, labels (-100 outside assistant turns), the length kept and the length whole."""
    if not getattr(tokenizer, "chat_template", None):
        raise DynatuneError("task chat-sft renders conversations with the tokenizer's chat template, but this "
                            "model's tokenizer has none; use a chat model (e.g. smollm2-135m, which is "
                            "SmolLM2-135M-Instruct) or a tokenizer with a chat_template.")
    if not getattr(tokenizer, "is_fast", False):
        raise DynatuneError("task chat-sft needs a fast tokenizer (character offsets map the assistant turns to "
                            "tokens); this model's tokenizer is a slow one.")
    text, spans = assistant_spans(tokenizer, messages, where)
    # the template writes the special tokens (BOS, turn markers) itself
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, return_attention_mask=False)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = []
    for tok, (a, b) in zip(ids, offsets):
        inside = b > a and any(s <= a and b <= e for s, e in spans)
        labels.append(tok if inside else -100)
    return {"input_ids": ids[:max_length], "labels": labels[:max_length], "tokens": len(ids)}
