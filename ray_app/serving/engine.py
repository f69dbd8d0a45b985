"""The transformers engine: batched, streaming generation with per-request sampling.

One decode loop serves a whole batch: prompts are left-padded, the KV cache is shared, and
every step yields, for each request, the text it produced since the last step. Each request
keeps its own temperature, top-p, seed, stop strings and token budget (`model.generate`
applies one setting to the whole batch, so it cannot serve mixed requests). Finished rows
are dropped from the cache so a long answer does not pay for short ones.

The engine knows nothing of HTTP or Ray; `ray_app.serving.app` drives it from Serve and the
benchmark drives it in-process.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class SamplingParams:
    """What one request asked for; validated by the API layer before it gets here."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    params: SamplingParams
    # Set by the caller when its client went away; the loop drops the row at the next step.
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class Delta:
    """New text for one request since the previous step; ``finish_reason`` on its last delta."""

    text: str
    completion_tokens: int
    finish_reason: str | None = None  # "stop" (EOS or a stop string) or "length"


class _Row:
    """Decode state of one request inside a batch."""

    def __init__(self, request: GenerationRequest, generator):
        self.request = request
        self.generator = generator
        self.token_ids: list[int] = []
        self.emitted = 0  # characters of the decoded text already sent
        self.done = False


class TransformersEngine:
    """A Hugging Face causal LM in eval mode, generating for batches of requests."""

    def __init__(self, model_dir: Path, device: str = "cpu", dtype: str = "auto", threads: int | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        torch_dtype = {
            "auto": torch.bfloat16 if device.startswith("cuda") else torch.float32,
            "float32": torch.float32,
            "bfloat16": torch.bfloat16,
            "float16": torch.float16,
        }[dtype]
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).to(self.device).eval()
        try:
            generation = GenerationConfig.from_pretrained(model_dir)
        except OSError:
            generation = self.model.generation_config
        eos = generation.eos_token_id if generation.eos_token_id is not None else self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        if self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(self.tokenizer.eos_token_id)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos_ids)
        self.context_length = int(getattr(self.model.config, "max_position_embeddings", 2048))

    # --- prompts --------------------------------------------------------------------------
    def chat_prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of ``messages`` through the model's chat template, ready for the answer."""
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def text_prompt_ids(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt).input_ids

    # --- generation -----------------------------------------------------------------------
    def generate(self, requests: list[GenerationRequest]) -> Iterator[list[Delta | None]]:
        """Decode ``requests`` together; each step yields one entry per request (None = nothing new).

        A request's last entry carries its ``finish_reason``; after it, the request gets None.
        """
        import torch

        rows = []
        for request in requests:
            generator = None
            if request.params.seed is not None:
                generator = torch.Generator(device=self.device).manual_seed(request.params.seed)
            rows.append(_Row(request, generator))
        width = max(len(r.prompt_ids) for r in requests)
        input_ids = torch.full((len(requests), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(requests), width), dtype=torch.long)
        for i, request in enumerate(requests):
            input_ids[i, width - len(request.prompt_ids) :] = torch.tensor(request.prompt_ids)
            attention[i, width - len(request.prompt_ids) :] = 1
        input_ids, attention = input_ids.to(self.device), attention.to(self.device)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        active = list(range(len(rows)))  # row index of each line still in the cache
        cache = None
        with torch.inference_mode():
            while active:
                out = self.model(
                    input_ids=input_ids,
                    attention_mask=attention,
                    position_ids=positions,
                    cache=cache,
                    use_cache=True,
                    logits_to_keep=1,
                )
                cache = out.cache
                logits = out.logits[:, -1, :].float()
                next_ids = [self._sample(logits[line], rows[index]) for line, index in enumerate(active)]
                step: list[Delta | None] = [None] * len(rows)
                for line, index in enumerate(active):
                    step[index] = self._advance(rows[index], next_ids[line])
                yield step
                keep = [line for line, index in enumerate(active) if not rows[index].done]
                if not keep:
                    break
                if len(keep) < len(active):
                    selected = torch.tensor(keep, device=self.device)
                    cache.batch_select_indices(selected)
                    attention = attention[selected]
                    positions = positions[selected]
                    next_ids = [next_ids[line] for line in keep]
                    active = [active[line] for line in keep]
                input_ids = torch.tensor(next_ids, device=self.device).unsqueeze(-1)
                attention = torch.cat([attention, attention.new_ones((len(active), 1))], dim=-1)
                positions = positions[:, -1:] + 1

    def _sample(self, logits, row: _Row) -> int:
        import torch

        params = row.request.params
        if params.temperature == 0:
            return int(logits.argmax())
        probs = torch.softmax(logits / params.temperature, dim=-1)
        if params.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            # keep the smallest prefix whose mass reaches top_p (always at least one token)
            outside = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p
            sorted_probs[outside] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=row.generator))

    def _advance(self, row: _Row, token_id: int) -> Delta:
        """Append ``token_id`` to ``row`` and return the text that became final."""
        params = row.request.params
        finish = None
        if token_id in self.eos_ids:
            finish = "stop"
        else:
            row.token_ids.append(token_id)
        text = self.tokenizer.decode(row.token_ids, skip_special_tokens=True)
        for stop in params.stop:
            at = text.find(stop, max(0, row.emitted - len(stop)))
            if at != -1:
                text, finish = text[:at], "stop"
        if finish is None and len(row.token_ids) >= params.max_tokens:
            finish = "length"
        if finish is None and row.request.cancelled.is_set():
            finish = "cancelled"
        if finish is None:
            # Hold back an incomplete UTF-8 sequence and anything that may be the start of a stop string.
            hold = max((len(stop) - 1 for stop in params.stop), default=0)
            end = len(text) - hold
            while end > row.emitted and text[end - 1] == "\ufffd":
                end -= 1
        else:
            end = len(text)
            row.done = True
        new_text = text[row.emitted : end] if end > row.emitted else ""
        row.emitted = max(row.emitted, end)
        return Delta(new_text, len(row.token_ids), finish)
