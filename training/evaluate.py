"""Evaluation of a model reference on a held-out chat set: loss and perplexity on the assistant
tokens, plus greedy answers to a few prompts. Used before/after training and by the promotion gate.

    llmops eval MODEL_REF --data training/data/chat_eval.jsonl
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from ray_app.settings import Settings, get_settings

DEFAULT_PROMPTS = ("What is the capital of France?",)


@dataclass
class EvalReport:
    """Held-out loss (mean NLL per assistant token), its perplexity, and sample generations."""

    model: str
    loss: float
    perplexity: float
    tokens: int
    examples: int
    samples: list[dict[str, str]] = field(default_factory=list)
    # (summed log-prob, tokens) of the completions asked for (``completions``): scored on the same load
    scores: list[tuple[float, int]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[dict[str, str]]:
    """Greedy answers to single-turn prompts, formatted with the chat template."""
    import torch

    samples = []
    for prompt in prompts:
        inputs = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        with torch.no_grad():
            output = model.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        samples.append({"prompt": prompt, "answer": answer.strip()})
    return samples


def perplexity(loss: float) -> float:
    """exp(loss), capped so a diverged model reports a large number instead of overflowing."""
    return math.exp(min(loss, 50.0))


def heldout_nll(model, examples: list[tuple[list[int], list[int]]]) -> tuple[float, int]:
    """Summed negative log-likelihood of the labelled tokens of ``(input_ids, labels)`` examples, and
    their count. Used after training and, on every rank at once (ZeRO-3 gathers weights per
    forward), every ``eval_every`` steps during it."""
    import torch

    from training.data import IGNORE_INDEX

    total_nll, total_tokens = 0.0, 0
    device = next(model.parameters()).device
    for input_ids, labels in examples:
        target = torch.tensor([labels], device=device)[:, 1:]
        count = int((target != IGNORE_INDEX).sum())
        if count == 0:
            continue
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([input_ids], device=device)).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        total_nll += float(nll)
        total_tokens += count
    return total_nll, total_tokens


def heldout_examples(
    uris: list[str], tokenizer, seq_len: int, settings: Settings, limit: int | None = None
) -> list[tuple[list[int], list[int]]]:
    """``(input_ids, labels)`` of the held-out conversations in ``uris`` (the first ``limit``);
    raises DatasetError when no assistant token falls inside ``seq_len``, before any model runs."""
    from training.data import IGNORE_INDEX, DatasetError, read_records, tokenize_chat

    conversations = read_records(list(uris), settings)[:limit]
    examples = [tokenize_chat(messages, tokenizer, seq_len)[:2] for messages in conversations]
    if not any(label != IGNORE_INDEX for _, labels in examples for label in labels[1:]):
        raise DatasetError(f"no assistant tokens within seq_len {seq_len} in {', '.join(uris)}")
    return examples


def evaluate_model(
    model_ref: str | None,
    data_uris: list[str],
    seq_len: int = 512,
    settings: Settings | None = None,
    prompts: list[str] | tuple[str, ...] = DEFAULT_PROMPTS,
    max_new_tokens: int = 32,
    adapter: str | None = None,
    completions: list[tuple[list[dict[str, str]], str]] | tuple = (),
) -> EvalReport:
    """Loss/perplexity of ``model_ref`` (with the LoRA ``adapter`` folder or store URI, if given) on the
    assistant tokens of ``data_uris``, greedy samples, and the scores of ``completions`` (as
    :func:`completion_scores`) from the same load of the model."""
    settings = settings or get_settings()
    model, tokenizer = load_model(model_ref, settings, adapter)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    examples = heldout_examples(data_uris, tokenizer, seq_len, settings)
    total_nll, total_tokens = heldout_nll(model, examples)
    loss = total_nll / total_tokens
    return EvalReport(
        model=model_ref or "default",
        loss=loss,
        perplexity=perplexity(loss),
        tokens=total_tokens,
        examples=len(examples),
        samples=generate_answers(model, tokenizer, list(prompts), max_new_tokens),
        scores=score_completions(model, tokenizer, list(completions), seq_len),
    )


def load_model(model_ref: str | None, settings: Settings, adapter: str | None = None):
    """``(model, tokenizer)`` of ``model_ref`` in fp32 and eval mode, with the LoRA ``adapter`` (a PEFT folder
    or its store URI) on it when given: what every held-out measure here scores."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ray_app.models import resolve_model

    folder = resolve_model(model_ref, settings)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(resolve_model(adapter, settings)))
    return model.eval(), tokenizer


def completion_scores(
    model_ref: str,
    items: list[tuple[list[dict[str, str]], str]],
    seq_len: int,
    settings: Settings | None = None,
    adapter: str | None = None,
) -> list[tuple[float, int]]:
    """``(summed log-prob, tokens)`` of each completion answering its conversation, under ``model_ref`` (with
    the LoRA ``adapter`` on it, if given).

    Only the completion's tokens are scored (``training.scoring.completion_tokens``): what the
    preference metrics and the promotion gate's replay and regression cases compare.
    """
    model, tokenizer = load_model(model_ref, settings or get_settings(), adapter)
    return score_completions(model, tokenizer, items, seq_len)


def score_completions(model, tokenizer, items: list[tuple[list[dict[str, str]], str]], seq_len: int):
    """:func:`completion_scores` on a model already loaded."""
    import torch

    from training.data import IGNORE_INDEX
    from training.scoring import completion_logps, completion_tokens

    scores = []
    for messages, completion in items:
        ids, labels = completion_tokens(messages, completion, tokenizer, seq_len)
        with torch.no_grad():
            logps = completion_logps(model, torch.tensor([ids]), torch.ones(1, len(ids)), torch.tensor([labels]))
        scores.append((float(logps[0]), sum(1 for label in labels[1:] if label != IGNORE_INDEX)))
    return scores
