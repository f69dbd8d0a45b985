"""Log-probabilities of completions: what preference training optimises and the promotion gate compares.

A completion is scored on its own tokens only, after the chat-templated conversation before it
(:func:`completion_tokens`); rows are left-padded so that only the completion's logits need
computing (:func:`completion_logps`). Plain torch; no Ray, no DeepSpeed.
"""

from __future__ import annotations

from training.data import IGNORE_INDEX


def sequence_logps(logits, labels):
    """Summed log-probability of each row's labelled tokens (labels already aligned with ``logits``' inputs)."""
    import torch

    target = labels[:, 1:]
    mask = target != IGNORE_INDEX
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = torch.gather(logprobs, 2, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(dim=-1)


def completion_logps(model, ids, mask, labels):
    """Summed log-probs of each row's labelled tokens under ``model``, from left-padded rows.

    The completions end every row, so only the logits of the last positions (from the one before
    the first labelled token) are computed: the vocabulary projection, most of a small model's
    cost, runs on the completion alone. Left padding changes no real token's logits (rotary
    positions are relative; the pads are masked).
    """
    labelled = (labels != IGNORE_INDEX).any(dim=0).nonzero()
    keep = labels.shape[1] - int(labelled.min()) + 1 if len(labelled) else 2
    logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits
    return sequence_logps(logits, labels[:, -keep:])


def completion_tokens(prompt: list[dict[str, str]], completion: str, tokenizer, seq_len: int):
    """``(input_ids, labels)`` of ``completion`` answering ``prompt``: only the completion is labelled.

    A sequence longer than ``seq_len`` loses the prompt's oldest tokens first (at most half of
    ``seq_len`` is kept for a long completion, whose end is cut).
    """

    def ids(conversation: list[dict[str, str]], generation_prompt: bool) -> list[int]:
        out = tokenizer.apply_chat_template(conversation, tokenize=True, add_generation_prompt=generation_prompt)
        return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "input_ids") else out)

    head = ids(prompt, True)
    answer = ids([*prompt, {"role": "assistant", "content": completion}], False)[len(head) :]
    answer = answer[: max(seq_len - min(len(head), seq_len // 2), 1)]
    head = head[len(head) - min(len(head), seq_len - len(answer)) :]
    return head + answer, [IGNORE_INDEX] * len(head) + answer
