"""The transformers engine: batched, streaming generation with per-request sampling.

One decode loop serves a whole batch: prompts are left-padded, the KV cache is shared, and
every step yields, for each request, the text it produced since the last step. Each request
keeps its own temperature, top-p, seed, stop strings and token budget (`model.generate`
applies one setting to the whole batch, so it cannot serve mixed requests). Finished rows
are dropped from the cache so a long answer does not pay for short ones.

:class:`ContinuousBatcher` runs that loop for a replica: a request that arrives while others
are decoding is prefilled on its own and joins the running batch at the next step (its KV
cache left-padded to the batch's length and concatenated), instead of waiting for the
whole batch to finish; columns every row has padding in are dropped again.

On CPU (float32), every linear layer runs as a oneDNN matmul over a weight packed once at load
(:func:`prepack_linear_layers`): torch's default CPU GEMM was slow for the few rows of a decode
step on the benchmark machine (a step of 8 rows cost twice a step of 1; packed, a third less).
The packed layers give the same tokens (tests compare them).

The engine knows nothing of HTTP or Ray; `ray_app.serving.app` drives it from Serve and the
benchmark drives it in-process.
"""

from __future__ import annotations

import functools
import inspect
import logging
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ray_app.serving.lora import Adapter, LoraSlots
from ray_app.serving.structured import GrammarMasks
from ray_app.serving.tools import has_tool_turns, tool_messages

GREEDY_BELOW = 1e-5  # temperatures under this decode greedily (the API maps them to 0 too; vLLM's bound)


@dataclass
class SamplingParams:
    """What one request asked for; validated by the API layer before it gets here."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    json_schema: str | None = None  # the answer is JSON matching it (checked by structured.check_schema)


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    params: SamplingParams
    # Set by the caller when its client went away; the loop drops the row at the next step.
    cancelled: threading.Event = field(default_factory=threading.Event)
    deadline: float | None = None  # time.monotonic() after which the loop drops the row ("deadline")
    adapter: Adapter | None = None  # a LoRA adapter of the base model to answer with (ray_app.serving.lora)


@dataclass
class Delta:
    """New text for one request since the previous step; ``finish_reason`` on its last delta."""

    text: str
    completion_tokens: int
    # "stop" (EOS or a stop string), "length"; early ends: "cancelled" (client gone), "deadline", "error"
    finish_reason: str | None = None


@dataclass
class BatchStats:
    """Counters of a ContinuousBatcher's loop: how full its forward passes were."""

    decode_steps: int = 0
    decode_rows: int = 0  # summed over steps: decode_rows / decode_steps = mean running batch
    prefills: int = 0
    prefill_rows: int = 0
    decode_seconds: float = 0.0  # wall time of completed decode steps: / decode_steps = mean step time
    prefill_seconds: float = 0.0  # of completed prefills
    cancelled_rows: int = 0  # dropped because their client left or their deadline passed
    failed_rows: int = 0  # failed alone (sampling or detokenizing raised); their batch went on


log = logging.getLogger(__name__)


class Row:
    """Decode state of one request inside a batch."""

    def __init__(
        self, request: GenerationRequest, generator, emit: Callable[[Delta | BaseException], None] | None = None
    ):
        self.request = request
        self.generator = generator
        self._emit = emit
        self.token_ids: list[int] = []
        self.emitted = 0  # characters of the decoded text already sent
        self.done = False
        self.failure: Exception | None = None  # what failed this row alone (the batch goes on)
        self.grammar = None  # a constrained row's xgrammar matcher (transformers engine)

    def emit(self, item: Delta | BaseException) -> None:
        """Hand ``item`` to the request's consumer; a consumer that fails (its event loop closed) is dropped."""
        if self._emit is None:
            return
        try:
            self._emit(item)
        except Exception:
            log.warning("a request's consumer failed to take its output; dropping the request", exc_info=True)
            self._emit = None
            self.request.cancelled.set()


class _PackedLinear:
    """Forward of an ``nn.Linear`` whose weight oneDNN packed once (inference only, CPU, float32)."""

    def __init__(self, module, batch_hint: int):
        import torch

        self.packed = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), batch_hint)
        self.bias = None if module.bias is None else module.bias.detach()
        self._linear = torch.ops.mkldnn._linear_pointwise  # looked up once: this runs per layer per step

    def __call__(self, x):
        return self._linear(x, self.packed, self.bias, "none", [], "")


def prepack_linear_layers(model, batch_hint: int = 8) -> int:
    """Run every ``nn.Linear`` of ``model`` (CPU, float32, eval) as a oneDNN matmul on a prepacked weight.

    The module stays in place (its ``forward`` is replaced and its weight is freed unless tied
    to another module, as the LM head is to the embeddings). ``batch_hint`` is the row count the
    packing is tuned for; any count works. Returns how many layers were packed: 0 when this torch
    has no oneDNN or the packed result disagrees with torch's on a probe (the model is untouched).
    """
    import torch

    linears = [
        module
        for module in model.modules()
        if isinstance(module, torch.nn.Linear) and not isinstance(module.__dict__.get("forward"), _PackedLinear)
    ]
    if not linears or not torch.backends.mkldnn.is_available():
        return 0
    try:
        with torch.inference_mode():
            probe, probed = linears[0], _PackedLinear(linears[0], batch_hint)
            x = torch.randn(3, probe.in_features, dtype=probe.weight.dtype)
            if not torch.allclose(probed(x), probe(x), rtol=1e-4, atol=1e-4):
                log.warning("oneDNN linear disagrees with torch's on a probe: keeping torch's")
                return 0
    except (AttributeError, RuntimeError) as exc:  # an older torch or a build without these ops
        log.warning("oneDNN prepacked linear unavailable (%s): keeping torch's", exc)
        return 0
    tied = {id(p) for module in model.modules() if not isinstance(module, torch.nn.Linear)
            for p in module.parameters(recurse=False)}  # fmt: skip
    with torch.inference_mode():
        for module in linears:
            module.forward = probed if module is probe else _PackedLinear(module, batch_hint)
            if id(module.weight) not in tied:
                module.weight = torch.nn.Parameter(module.weight.new_empty(0), requires_grad=False)
    return len(linears)


def load_tokenizer(model_dir: Path):
    """The model folder's tokenizer. With a ``tokenizer.json`` (every fast tokenizer) it is loaded
    as it is: AutoTokenizer first loads the model's config class, which imports torch (2.9 s of a
    replica's start against 0.7 s; an OpenVINO replica needs no torch at all)."""
    if (Path(model_dir) / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(model_dir)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


class TextEngine:
    """What every engine does with text: the model folder's tokenizer, prompts, and detokenizing a
    row's tokens into the new text of each step (EOS, stop strings, the token budget, held-back
    partial UTF-8 and stop-string prefixes)."""

    def __init__(self, model_dir: Path, fallback_generation=None):
        from transformers import GenerationConfig

        self.tokenizer = load_tokenizer(model_dir)
        try:
            generation = GenerationConfig.from_pretrained(model_dir)
        except OSError:
            generation = fallback_generation
        eos = generation.eos_token_id if generation is not None and generation.eos_token_id is not None else None
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        if self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(self.tokenizer.eos_token_id)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos_ids)

    # --- prompts --------------------------------------------------------------------------
    def chat_prompt_ids(self, messages: list[dict], functions: list[dict] | None = None) -> list[int]:
        """Token ids of ``messages`` through the model's chat template, ready for the answer; with the
        ``functions`` the model may call (its template renders them, or tools.tool_messages does)."""
        tools = [{"type": "function", "function": function} for function in functions or []]
        if (tools or has_tool_turns(messages)) and not self.template_renders_tools:
            messages, tools = tool_messages(messages, functions or []), []
        text = self.tokenizer.apply_chat_template(
            messages, tools=tools or None, tokenize=False, add_generation_prompt=True
        )
        return self.tokenizer(text, add_special_tokens=False).input_ids

    @functools.cached_property
    def template_renders_tools(self) -> bool:
        """Whether the chat template shows the model the tools it is given (SmolLM2's does not)."""
        probe = [{"role": "user", "content": "hi"}]
        tool = {"type": "function", "function": {"name": "probe_tool_name", "parameters": {"type": "object"}}}
        try:
            shown = self.tokenizer.apply_chat_template(probe, tools=[tool], tokenize=False, add_generation_prompt=True)
        except Exception:  # a template that fails on tools cannot render them
            return False
        return "probe_tool_name" in shown

    def text_prompt_ids(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt).input_ids

    def advance(self, row: Row, token_id: int) -> Delta:
        """Append ``token_id`` to ``row`` and return the text that became final."""
        if row.failure is not None:
            row.done = True
            return Delta("", len(row.token_ids), "error")
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
        if finish is None:
            finish = ended_early(row.request)
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


class TransformersEngine(TextEngine):
    """A Hugging Face causal LM in eval mode, generating for batches of requests.

    ``prepack`` (CPU, float32 only): run the linear layers on oneDNN-packed weights; turn it off
    to change the weights after loading (then call :func:`prepack_linear_layers` yourself).
    """

    def __init__(
        self,
        model_dir: Path,
        device: str = "cpu",
        dtype: str = "auto",
        threads: int | None = None,
        prepack: bool = True,
        max_adapters: int = 0,
    ):
        import torch
        from transformers import AutoModelForCausalLM

        if threads:
            torch.set_num_threads(threads)
        self.model_dir = model_dir
        self.device = torch.device(device)
        torch_dtype = {
            "auto": torch.bfloat16 if device.startswith("cuda") else torch.float32,
            "float32": torch.float32,
            "bfloat16": torch.bfloat16,
            "float16": torch.float16,
        }[dtype]
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).to(self.device).eval()
        super().__init__(model_dir, self.model.generation_config)
        self.context_length = int(getattr(self.model.config, "max_position_embeddings", 2048))
        # transformers 5.24 renamed the KV cache argument and output field `past_key_values` -> `cache`
        # (the CUDA check ran 5.17); the engine passes whichever the model's forward takes.
        self._cache_arg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        self._grammars: GrammarMasks | None = None  # built on the first constrained request
        self.lora = LoraSlots(max_adapters) if max_adapters else None  # LoRA adapters, loaded on first use
        self._rows: weakref.WeakSet[Row] = weakref.WeakSet()  # rows prefilled: the adapters in use
        self.prepacked = 0  # linear layers on oneDNN-packed weights
        if prepack and self.device.type == "cpu" and torch_dtype == torch.float32:
            self.prepacked = prepack_linear_layers(self.model)

    @staticmethod
    def _cache_of(output):
        return output.cache if hasattr(output, "cache") else output.past_key_values

    # --- generation -----------------------------------------------------------------------
    def generate(self, requests: list[GenerationRequest]) -> Iterator[list[Delta | None]]:
        """Decode ``requests`` together; each step yields one entry per request (None = nothing new).

        A request's last entry carries its ``finish_reason``; after it, the request gets None.
        """
        rows = [self.new_row(request) for request in requests]
        position = {id(row): index for index, row in enumerate(rows)}
        batch: _Batch | None = self.prefill(rows)
        while batch is not None:
            step: list[Delta | None] = [None] * len(rows)
            for row, token_id in zip(batch.rows, batch.next_ids, strict=True):
                step[position[id(row)]] = self.advance(row, token_id)
            yield step
            keep = [line for line, row in enumerate(batch.rows) if not row.done]
            if not keep:
                return
            batch.select(keep)
            batch = self.decode(batch)

    def new_row(self, request: GenerationRequest, emit: Callable[[Delta | BaseException], None] | None = None) -> Row:
        import torch

        if not request.prompt_ids:
            raise ValueError("a generation request needs at least one prompt token")

        generator = None
        if request.params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(request.params.seed)
        check_adapter_served(request, self.lora)
        row = Row(request, generator, emit)
        if request.params.json_schema is not None:
            if self._grammars is None:
                vocab = self.model.get_output_embeddings().weight.shape[0]
                self._grammars = GrammarMasks(self.tokenizer, vocab, self.eos_ids)
            row.grammar = self._grammars.matcher(request.params.json_schema)
        return row

    def prefill(self, rows: list[Row]) -> _Batch:
        """Run the prompts of ``rows`` left-padded to one width; sample each row's first token."""
        import torch

        width = max(len(row.request.prompt_ids) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids = row.request.prompt_ids
            input_ids[i, width - len(ids) :] = torch.tensor(ids)
            attention[i, width - len(ids) :] = 1
        input_ids, attention = input_ids.to(self.device), attention.to(self.device)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        self._take_adapters(rows)
        self._select_adapters(rows)
        with torch.inference_mode():
            out = self.model(input_ids=input_ids, attention_mask=attention, position_ids=positions,
                             use_cache=True, logits_to_keep=1)  # fmt: skip
        next_ids = self._sample_rows(out.logits[:, -1, :].float(), rows)
        return _Batch(rows, self._cache_of(out), attention, positions[:, -1:], next_ids)

    def decode(self, batch: _Batch) -> _Batch:
        """One step for every row of ``batch``: feed the tokens sampled last, sample the next ones."""
        import torch

        input_ids = torch.tensor(batch.next_ids, device=self.device).unsqueeze(-1)
        batch.attention = torch.cat([batch.attention, batch.attention.new_ones((len(batch.rows), 1))], dim=-1)
        batch.positions = batch.positions + 1
        self._select_adapters(batch.rows)
        with torch.inference_mode():
            out = self.model(input_ids=input_ids, attention_mask=batch.attention, position_ids=batch.positions,
                             use_cache=True, logits_to_keep=1, **{self._cache_arg: batch.cache})  # fmt: skip
        batch.cache = self._cache_of(out)
        batch.next_ids = self._sample_rows(out.logits[:, -1, :].float(), batch.rows)
        return batch

    def _take_adapters(self, rows: list[Row]) -> None:
        """Load the adapters ``rows`` ask for (between forward passes: it changes the model)."""
        needed = {row.request.adapter.name: row.request.adapter for row in rows if row.request.adapter}
        if self.lora is not None and needed:
            busy = {row.request.adapter.name for row in self._rows if row.request.adapter and not row.done}
            self.lora.prepare(self.model, needed.values(), busy)
        self._rows.update(rows)

    def _select_adapters(self, rows: list[Row]) -> None:
        """Before a forward pass: which adapter each of ``rows`` is answered with."""
        if self.lora is not None:
            self.lora.select([row.request.adapter for row in rows], self.device)

    def _sample_rows(self, logits, rows: list[Row]) -> list[int]:
        """The next token of each row; a row whose sampling raises is failed alone (its token is padding)."""
        next_ids = []
        for i, row in enumerate(rows):
            try:
                next_ids.append(self._sample(logits[i], row))
            except Exception as exc:
                log.exception("sampling failed for one row; the rest of its batch goes on")
                row.failure = exc
                next_ids.append(self.pad_id)
        return next_ids

    def _sample(self, logits, row: Row) -> int:
        if row.grammar is None:
            return self._draw(logits, row)
        self._grammars.mask(logits, row.grammar)
        token = self._draw(logits, row)
        self._grammars.accept(row.grammar, token)
        return token

    def _draw(self, logits, row: Row) -> int:
        import torch

        params = row.request.params
        if params.temperature < GREEDY_BELOW:  # also keeps logits / temperature finite
            return int(logits.argmax())
        probs = torch.softmax(logits / params.temperature, dim=-1)
        if params.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            # keep the smallest prefix whose mass reaches top_p (always at least one token)
            outside = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p
            outside[0] = False  # a top_p that underflows float32 (5e-324) would otherwise keep nothing
            sorted_probs[outside] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=row.generator))


def ended_early(request: GenerationRequest) -> str | None:
    """Why ``request`` must stop now although it could go on: its client left, or its deadline passed."""
    if request.cancelled.is_set():
        return "cancelled"
    if request.deadline is not None and time.monotonic() > request.deadline:
        return "deadline"
    return None


class _Batch:
    """The running batch of a ContinuousBatcher: rows, their KV cache, attention mask and next inputs."""

    def __init__(self, rows: list[Row], cache, attention, positions, next_ids: list[int]):
        self.rows, self.cache, self.attention, self.positions, self.next_ids = (
            rows,
            cache,
            attention,
            positions,
            next_ids,
        )

    def select(self, keep: list[int]) -> None:
        """Keep only the rows at ``keep``, then drop the leading columns that are padding in every row."""
        import torch

        if len(keep) < len(self.rows):
            selected = torch.tensor(keep, device=self.attention.device)
            self.cache.batch_select_indices(selected)
            self.attention, self.positions = self.attention[selected], self.positions[selected]
            self.rows = [self.rows[i] for i in keep]
            self.next_ids = [self.next_ids[i] for i in keep]
        used = self.attention.any(dim=0).nonzero()
        start = int(used[0]) if len(used) else 0
        if start > 0:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]
            self.attention = self.attention[:, start:]

    def merge(self, other: _Batch) -> None:
        """Append ``other``'s rows: the shorter cache is left-padded (masked out) to the longer one."""
        import torch

        width = max(self.attention.shape[1], other.attention.shape[1])

        def padded(tensor, length: int, dim: int):
            missing = width - length
            if missing == 0:
                return tensor
            shape = list(tensor.shape)
            shape[dim] = missing
            return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)

        mine, theirs = self.attention.shape[1], other.attention.shape[1]
        for layer, new in zip(self.cache.layers, other.cache.layers, strict=True):
            layer.keys = torch.cat([padded(layer.keys, mine, 2), padded(new.keys, theirs, 2)], dim=0)
            layer.values = torch.cat([padded(layer.values, mine, 2), padded(new.values, theirs, 2)], dim=0)
        self.attention = torch.cat([padded(self.attention, mine, 1), padded(other.attention, theirs, 1)], dim=0)
        self.positions = torch.cat([self.positions, other.positions], dim=0)
        self.rows += other.rows
        self.next_ids += other.next_ids


def check_adapter_served(request: GenerationRequest, lora) -> None:
    """Refuse a request for a LoRA adapter on an engine that holds none (``lora``: its adapters, or None)."""
    if request.adapter is not None and lora is None:
        raise ValueError("this engine serves no LoRA adapters (max_adapters: 0)")


class DecodeLoop:
    """What every engine's batcher shares: a loop on a thread of its own that builds the engine
    there, a queue of waiting rows, counters, and the interface a replica drives.

    ``submit(request, emit)`` returns at once; ``emit`` is called from the loop's thread with
    each Delta (the last one has a ``finish_reason``) or with an exception if generation
    failed. ``engine`` may be a function that builds the engine: it is then called on the loop's
    thread (the constructor waits for it and raises what it raised). A server should do this, so
    that all of the process's model work runs on one thread. libgomp gives every thread that runs a
    parallel op a team of its own, and once the process holds more such threads than CPUs it
    stops spinning between parallel regions: a model loaded on one thread and decoded on
    another decoded ~15% slower, with the CPUs ~30% idle (measured on the benchmark machine).
    Subclasses write ``_loop`` (and may check the built engine in ``_built``).
    """

    thread_name = "decode-loop"

    def __init__(self, engine, max_batch_size: int = 8):
        self.max_batch_size = max_batch_size
        self._waiting: queue.Queue[Row] = queue.Queue()
        self.stats = BatchStats()  # written by the loop's thread only
        self.running = 0  # rows in the batch being decoded (written by the loop's thread)
        self._stopped = threading.Event()
        build = engine if callable(engine) else (lambda: engine)
        started: queue.Queue[BaseException | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, args=(build, started), name=self.thread_name, daemon=True)
        self._thread.start()
        failure = started.get()
        if failure is not None:
            raise failure

    def _run(self, build: Callable, started: queue.Queue) -> None:
        try:
            self.engine = build()
            self._built()
        except BaseException as exc:  # the constructor raises it
            started.put(exc)
            return
        started.put(None)
        self._loop()

    def _built(self) -> None:
        """Called on the loop's thread once the engine is built; raise to refuse it."""

    def _loop(self) -> None:
        raise NotImplementedError

    def new_row(self, request: GenerationRequest, emit: Callable[[Delta | BaseException], None]) -> Row:
        if not request.prompt_ids:
            raise ValueError("a generation request needs at least one prompt token")
        check_adapter_served(request, getattr(self.engine, "lora", None))
        return Row(request, None, emit)

    def submit(self, request: GenerationRequest, emit: Callable[[Delta | BaseException], None]) -> None:
        self._waiting.put(self.new_row(request, emit))

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=10)

    def occupancy(self) -> tuple[int, int]:
        """(requests waiting for a row, rows decoding): what a replica reports as its queue and batch."""
        return self._waiting.qsize(), self.running

    def alive(self) -> bool:
        """False once the loop ended (stopped, or its engine died): the replica is then unhealthy."""
        return self._thread.is_alive()

    def _take(self, limit: int) -> list[Row]:
        """Up to ``limit`` waiting rows; rows whose client left or whose deadline passed are dropped."""
        rows = []
        while len(rows) < limit:
            try:
                row = self._waiting.get_nowait()
            except queue.Empty:
                break
            if self._ended_in_queue(row):
                continue
            rows.append(row)
        return rows

    def _ended_in_queue(self, row: Row) -> bool:
        """True (and the row is told why) if its client left or its deadline passed while it waited."""
        reason = ended_early(row.request)
        if reason is None:
            return False
        self.stats.cancelled_rows += 1
        row.emit(Delta("", 0, reason))
        return True


class ContinuousBatcher(DecodeLoop):
    """Continuous batching over a TransformersEngine: one decode loop in a thread, requests join it.

    At most ``max_batch_size`` requests decode together; more wait their turn. When the loop is
    idle, the first arrival waits ``gather_s`` for others to prefill with it. (See DecodeLoop.)
    """

    thread_name = "continuous-batcher"

    def __init__(
        self,
        engine: TransformersEngine | Callable[[], TransformersEngine],
        max_batch_size: int = 8,
        gather_s: float = 0.01,
    ):
        self.gather_s = gather_s
        super().__init__(engine, max_batch_size)

    def _built(self) -> None:
        self._supported = all(type(layer).__name__ == "DynamicLayer" for layer in self._probe_layers())

    def _probe_layers(self) -> list:
        from transformers import DynamicCache

        try:
            return list(DynamicCache(config=self.engine.model.config).layers)
        except Exception:  # an unusual cache layout: static batching only
            return [None]

    def new_row(self, request: GenerationRequest, emit: Callable[[Delta | BaseException], None]) -> Row:
        return self.engine.new_row(request, emit)

    # --- the loop (its own thread) ---------------------------------------------------------
    def _loop(self) -> None:
        batch: _Batch | None = None
        while not self._stopped.is_set():
            try:
                if batch is None:
                    try:
                        first = self._waiting.get(timeout=0.5)
                    except queue.Empty:
                        continue
                    if self._ended_in_queue(first):
                        continue
                    if self.gather_s:
                        self._stopped.wait(self.gather_s)
                    newcomers = [first, *self._take(self.max_batch_size - 1)]
                    batch = self._prefill(newcomers)
                else:
                    room = self.max_batch_size - len(batch.rows) if self._supported else 0
                    newcomers = self._take(room)
                    if newcomers:
                        joining = self._prefill(newcomers)
                        if joining is not None:
                            batch.merge(joining)
                if batch is not None:
                    batch = self._decode(batch)
                self.running = len(batch.rows) if batch is not None else 0
            except Exception as exc:  # a failed forward pass fails the requests in it, not the loop
                log.exception("generation failed")
                rows = batch.rows if batch is not None else []
                for row in rows:
                    row.emit(exc)
                batch, self.running = None, 0

    def _prefill(self, rows: list[Row]) -> _Batch | None:
        """Prefill newcomers and emit their first tokens; None if all finished (or failed: they are told)."""
        self.stats.prefills += 1
        self.stats.prefill_rows += len(rows)
        started = time.perf_counter()
        try:
            batch = self.engine.prefill(rows)
        except Exception as exc:
            log.exception("prefill failed")
            for row in rows:
                row.emit(exc)
            return None
        self.stats.prefill_seconds += time.perf_counter() - started
        return self._after_step(batch)

    def _decode(self, batch: _Batch) -> _Batch | None:
        self.stats.decode_steps += 1
        self.stats.decode_rows += len(batch.rows)
        started = time.perf_counter()
        batch = self.engine.decode(batch)
        self.stats.decode_seconds += time.perf_counter() - started
        return self._after_step(batch)

    def _after_step(self, batch: _Batch) -> _Batch | None:
        """Emit each row's new text for the token just sampled; drop finished rows.

        A row that failed alone (sampling or detokenizing raised) gets its exception and is
        dropped; the other rows go on as if it had never been there.
        """
        keep = []
        for i, row in enumerate(batch.rows):
            try:
                delta = self.engine.advance(row, batch.next_ids[i])
            except Exception as exc:
                log.exception("detokenizing failed for one row; the rest of its batch goes on")
                row.failure, row.done = exc, True
            if row.failure is not None:
                self.stats.failed_rows += 1
                row.emit(row.failure)
                continue
            if delta.finish_reason in ("cancelled", "deadline"):
                self.stats.cancelled_rows += 1
            if delta.text or delta.finish_reason:
                row.emit(delta)
            if not row.done:
                keep.append(i)
        if not keep:
            return None
        batch.select(keep)
        return batch
