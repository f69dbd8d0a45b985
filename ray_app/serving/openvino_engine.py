"""The OpenVINO engine: OpenVINO GenAI's continuous batching pipeline behind our batcher's interface.

On CPU it is the fast engine (measured side by side with ours and `model.generate`:
``benchmarks/serve_throughput.py``): weight-only int8 (or int4) matmuls on AMX/AVX-512, paged
attention, and a prefix cache, so a conversation's next turn reuses the KV of the turns before it
and its time to first token does not grow with the history.

The pipeline runs in a child process of the replica (``python -m ray_app.serving.openvino_engine``),
like vLLM's engine core: its ``step()`` holds the GIL for the whole forward pass (measured: a
Python thread beside it ran once per step instead of every millisecond), which in the replica's
process would stall the event loop that streams the answers. The child adds requests, steps, and
sends each step's new token ids back over a socket (length-prefixed JSON); it exits when the
replica closes the socket or dies.

:class:`OpenVINOBatcher` is what a replica drives, with :class:`~ray_app.serving.engine.ContinuousBatcher`'s
interface (``submit``, ``occupancy``, ``stats``, ``stop``): its thread moves arriving requests
into the child and turns their token ids into :class:`~ray_app.serving.engine.Delta` s with the
same text rules as the transformers engine (stop strings held back until they cannot match,
partial UTF-8 held back, the token budget, cancelled and past-deadline rows dropped at the next
step). Sampling (temperature, top-p, seed) and structured output (the grammar of a JSON schema,
from :func:`~ray_app.serving.structured.check_schema`) are the pipeline's own; stop
strings are ours (the request is stopped in the child when one appears).

The model is the IR :mod:`ray_app.serving.openvino_export` converts once per model and caches.

LoRA adapters (``max_adapters``) are served in per-adapter groups: OpenVINO GenAI's continuous
batching applies the adapters a pipeline was built with to every request in it, and cannot switch
them per request (openvino.genai PR #3798). So the child holds, beside the base's pipeline, one
pipeline per held adapter (``MODE_STATIC``: the adapter's weights are constants of its compiled
model), built on the adapter's first request and stepped in turn with the others; at most
``max_adapters`` are held, building one more drops the least recently used one with no running
request. Each is a compiled copy of the model (measured: ~570 MiB for the default model) and
costs a forward pass per step, which is why the transformers engine (all adapters' rows in one
batch, one copy) is the engine for adapter-heavy traffic. Adapter pipelines run on an
uncompressed IR of the model (``adapter_ir_dir``; GenAI's LoRA does not match int8- or
int4-compressed weights, measured: the adapter is then silently unused). GenAI applies ``B @ A``
as given, so the replica hands it the adapter with PEFT's ``lora_alpha / r`` folded into B
(:func:`~ray_app.serving.lora.folded_weights`), one small file per adapter in a folder removed
with the engine.
"""

from __future__ import annotations

import json
import logging
import os
import random
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ray_app.serving.engine import GREEDY_BELOW, DecodeLoop, Delta, GenerationRequest, Row, TextEngine, ended_early
from ray_app.serving.lora import Adapter, AdapterError, folded_weights
from ray_app.serving.structured import check_schema

log = logging.getLogger(__name__)

PRECISIONS = {"auto": None, "f32": "f32", "bf16": "bf16"}  # INFERENCE_PRECISION_HINT; auto: bf16 where AMX
START_TIMEOUT_S = 600


class Channel:
    """Length-prefixed JSON messages over a stream socket (the replica <-> its pipeline process)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, message) -> None:
        data = json.dumps(message).encode()
        self.sock.sendall(len(data).to_bytes(4, "big") + data)

    def recv(self):
        """The next message; raises EOFError when the other side closed."""
        size = int.from_bytes(self._exactly(4), "big")
        return json.loads(self._exactly(size))

    def ready(self, timeout: float | None) -> bool:
        return bool(select.select([self.sock], [], [], timeout)[0])

    def _exactly(self, size: int) -> bytes:
        chunks, missing = [], size
        while missing:
            chunk = self.sock.recv(min(missing, 1 << 20))
            if not chunk:
                raise EOFError("the other side closed the channel")
            chunks.append(chunk)
            missing -= len(chunk)
        return b"".join(chunks)


def sampling_options(request: GenerationRequest, eos_ids: set[int]) -> dict:
    """The pipeline's sampling settings for ``request``: greedy below GREEDY_BELOW, else its own draw."""
    params = request.params
    options: dict = {"max_new_tokens": params.max_tokens, "stop_token_ids": sorted(eos_ids), "do_sample": False}
    if params.temperature >= GREEDY_BELOW:
        # The pipeline's default seed is one constant: unseeded requests draw their own. Its seed is
        # unsigned 64-bit; OpenAI's is any integer (negative ones too): the same seed, the same draw.
        seed = params.seed % (1 << 64) if params.seed is not None else random.getrandbits(32)
        # top_p is float32 in the pipeline: one below 1e-30 would underflow to 0, which it refuses;
        # 1e-30 keeps only the most likely token, as any tiny top_p does in the transformers engine.
        top_p = max(params.top_p, 1e-30)
        options.update(do_sample=True, temperature=params.temperature, top_p=top_p, rng_seed=seed)
    if params.json_schema is not None:  # the pipeline constrains the row by our grammar (compact JSON)
        options["grammar"] = check_schema(params.json_schema)
    return options


@dataclass
class HeldAdapters:
    """The LoRA adapters the pipeline process holds a pipeline for (least recently used first), as it
    last reported them, and how many it built and dropped."""

    loaded: list[str] = field(default_factory=list)
    loads: int = 0
    unloads: int = 0


class OpenVINOEngine(TextEngine):
    """An OpenVINO IR folder (from :func:`ray_app.serving.openvino_export.openvino_model`) in a
    ContinuousBatchingPipeline in a child process, with the folder's Hugging Face tokenizer here
    for prompts and text; with ``max_adapters``, LoRA adapters on ``adapter_ir_dir`` (see the module)."""

    def __init__(
        self,
        ir_dir: Path,
        threads: int | None = None,
        max_batch_size: int = 8,
        kv_cache_gb: int = 1,
        prefix_cache: bool = True,
        precision: str = "auto",
        adapter_ir_dir: Path | None = None,
        max_adapters: int = 0,
    ):
        if max_adapters and adapter_ir_dir is None:
            raise ValueError("OpenVINOEngine: max_adapters needs adapter_ir_dir (an IR with uncompressed weights)")
        config = json.loads((ir_dir / "config.json").read_text())
        self.model_dir = ir_dir
        self.lora = HeldAdapters() if max_adapters else None
        self._folded: dict[str, Path] = {}  # adapter name -> its weights as handed to the pipeline
        self._folded_dir = Path(tempfile.mkdtemp(prefix="llmops-openvino-lora-")) if max_adapters else None
        self.prepacked = 0  # the transformers engine's counter; nothing to prepack here
        self.context_length = int(config.get("max_position_embeddings") or 2048)
        options = {
            "ir_dir": str(ir_dir),
            "threads": threads,
            "max_batch_size": max_batch_size,
            "max_batched_tokens": max(self.context_length, 256),
            "kv_cache_gb": kv_cache_gb,
            "prefix_cache": prefix_cache,
            "precision": PRECISIONS[precision],
            "adapter_ir_dir": str(adapter_ir_dir) if adapter_ir_dir else None,
            "max_adapters": max_adapters,
        }
        # The child compiles the model while this process loads the tokenizer (importing transformers
        # and torch takes seconds): a replica that wakes from zero answers that much sooner.
        mine, theirs = socket.socketpair()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ray_app.serving.openvino_engine", str(theirs.fileno()), json.dumps(options)],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
        )
        theirs.close()
        self.channel = Channel(mine)
        try:
            super().__init__(ir_dir)
        except BaseException:
            self.close()
            raise
        self._wait_until_ready()

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.channel.ready(1.0):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"the OpenVINO pipeline process did not start (exit {self.process.returncode})")
        reply = self.channel.recv()
        if reply[0] != "ready":
            self.close()
            raise RuntimeError(f"the OpenVINO pipeline could not load {self.model_dir}: {reply[1]}")

    def add(self, request_id: int, request: GenerationRequest) -> None:
        """Hand ``request`` to the pipeline (its tokens come back in "step" messages); raises
        AdapterError when its adapter's weights cannot be read."""
        adapter = request.adapter and [request.adapter.name, str(self._adapter_file(request.adapter))]
        self.channel.send(["add", request_id, request.prompt_ids, sampling_options(request, self.eos_ids), adapter])

    def _adapter_file(self, adapter: Adapter) -> Path:
        """The adapter's weights with PEFT's scale folded in, written once per adapter for the pipeline process."""
        if adapter.name not in self._folded:
            from safetensors.torch import save_file

            assert self._folded_dir is not None, "checked by the batcher: this engine serves no adapters"
            path = self._folded_dir / f"{len(self._folded)}.safetensors"
            save_file(folded_weights(adapter.folder), str(path))
            self._folded[adapter.name] = path
        return self._folded[adapter.name]

    def finish(self, request_id: int) -> None:
        """Stop generating for ``request_id`` (a stop string, the client left, the deadline passed)."""
        self.channel.send(["stop", request_id])

    def close(self) -> None:
        self.channel.sock.close()  # the child exits on EOF
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        if self._folded_dir is not None:
            shutil.rmtree(self._folded_dir, ignore_errors=True)


class OpenVINOBatcher(DecodeLoop):
    """Drives an OpenVINOEngine with ContinuousBatcher's interface (see DecodeLoop).

    At most ``max_batch_size`` requests are in the pipeline; more wait in arrival order, and are
    dropped there when cancelled or past their deadline.
    """

    thread_name = "openvino-batcher"

    def __init__(self, engine: OpenVINOEngine | Callable[[], OpenVINOEngine], max_batch_size: int = 8):
        self._rows: dict[int, Row] = {}  # in the pipeline, by request id
        self._next_id = 0
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        super().__init__(engine, max_batch_size)

    def submit(self, request: GenerationRequest, emit: Callable[[Delta | BaseException], None]) -> None:
        super().submit(request, emit)
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:  # the loop has plenty of wake-ups pending
            pass

    def stop(self) -> None:
        super().stop()
        self.engine.close()

    # --- the loop (its own thread) ---------------------------------------------------------
    def _loop(self) -> None:
        channel = self.engine.channel
        while not self._stopped.is_set():
            readable = select.select([channel, self._wake_r], [], [], 0.5)[0]
            if self._wake_r in readable:
                os.read(self._wake_r, 4096)
            self._admit()
            alive = channel not in readable or self._receive(channel)
            self.running = len(self._rows)
            if not alive:
                return

    def _receive(self, channel: Channel) -> bool:
        """Handle the pipeline's next message; False when its process is gone (its requests are failed)."""
        try:
            message = channel.recv()
        except (EOFError, OSError) as exc:
            if not self._stopped.is_set():
                self._fail_all(RuntimeError(f"the OpenVINO pipeline process died: {exc}"))
                log.error("the OpenVINO pipeline process died (exit %s)", self.engine.process.poll())
            return False
        if message[0] == "step":
            self._on_step(*message[1:])
        elif message[0] == "refused":
            self._end(message[1], RuntimeError(f"the OpenVINO pipeline refused the request: {message[2]}"))
        elif message[0] == "failed":  # one pipeline's step: its requests are failed, the others go on
            log.error("an OpenVINO pipeline step failed: %s", message[1])
            for request_id in message[2]:
                self._end(request_id, RuntimeError(f"generation failed: {message[1]}"))
        elif message[0] == "adapters":
            self.engine.lora = HeldAdapters(*message[1:])
        return True

    def _admit(self) -> None:
        """Move waiting rows into the pipeline while it has room (ended ones are told and dropped)."""
        for row in self._take(self.max_batch_size - len(self._rows)):
            self._next_id += 1
            try:
                self.engine.add(self._next_id, row.request)
            except AdapterError as exc:
                row.emit(exc)
                continue
            self._rows[self._next_id] = row
            self.stats.prefills += 1
            self.stats.prefill_rows += 1

    def _on_step(self, seconds: float, rows: int, updates: list) -> None:
        self.stats.decode_steps += 1
        self.stats.decode_rows += rows
        self.stats.decode_seconds += seconds
        updated = {request_id: (tokens, status) for request_id, tokens, status in updates}
        for request_id in list(self._rows):
            tokens, status = updated.get(request_id, ([], "RUNNING"))
            self._collect(request_id, tokens, status)

    def _collect(self, request_id: int, tokens: list[int], status: str) -> None:
        """Emit what the request produced in the last step; drop it from the pipeline once it is done."""
        row = self._rows[request_id]
        delta = None
        try:
            for token in tokens:
                delta = self.engine.advance(row, token)
                if delta.text or delta.finish_reason:
                    row.emit(delta)
                if row.done:
                    break
            if not row.done and (reason := ended_early(row.request)) is not None:
                row.done, delta = True, Delta("", len(row.token_ids), reason)
                row.emit(delta)
        except Exception as exc:
            log.exception("detokenizing failed for one row; the rest of its batch goes on")
            self.stats.failed_rows += 1
            row.done, delta = True, None
            row.emit(exc)
        if row.done:
            if delta is not None and delta.finish_reason in ("cancelled", "deadline"):
                self.stats.cancelled_rows += 1
            if status == "RUNNING":
                self.engine.finish(request_id)  # free its KV blocks now
            del self._rows[request_id]
        elif status == "FINISHED":  # ended by the pipeline without a token we count as the end
            self._end(request_id, Delta("", len(row.token_ids), "stop"))
        elif status != "RUNNING":
            self.stats.failed_rows += 1
            self._end(request_id, RuntimeError(f"the OpenVINO pipeline ended the request: {status}"))

    def _end(self, request_id: int, item: Delta | BaseException) -> None:
        row = self._rows.pop(request_id, None)
        if row is not None:
            row.emit(item)

    def _fail_all(self, exc: BaseException) -> None:
        for request_id in list(self._rows):
            self._end(request_id, exc)


# --- the pipeline process ------------------------------------------------------------------------
def _build_pipeline(options: dict, ir_dir: str, adapter_file: str | None = None):
    import openvino_genai

    scheduler = openvino_genai.SchedulerConfig()
    scheduler.cache_size = options["kv_cache_gb"]  # GB of KV blocks shared by running and cached prefixes
    scheduler.enable_prefix_caching = options["prefix_cache"]
    scheduler.max_num_seqs = options["max_batch_size"]
    scheduler.max_num_batched_tokens = options["max_batched_tokens"]
    properties: dict[str, object] = {}
    if options["threads"]:
        properties["INFERENCE_NUM_THREADS"] = options["threads"]
    if options["precision"]:
        properties["INFERENCE_PRECISION_HINT"] = options["precision"]
    if adapter_file is not None:  # alpha 1: the file's B has PEFT's scale folded in
        static = openvino_genai.AdapterConfig.Mode.MODE_STATIC
        properties["adapters"] = openvino_genai.AdapterConfig(openvino_genai.Adapter(adapter_file), 1.0, static)
    return openvino_genai.ContinuousBatchingPipeline(ir_dir, scheduler, "CPU", properties)


def _generation_config(options: dict):
    import openvino_genai

    config = openvino_genai.GenerationConfig()
    config.max_new_tokens = options["max_new_tokens"]
    config.stop_token_ids = set(options["stop_token_ids"])
    config.do_sample = options["do_sample"]
    if options["do_sample"]:
        config.temperature, config.top_p = options["temperature"], options["top_p"]
        config.rng_seed = options["rng_seed"]
    if "grammar" in options:
        config.structured_output_config = openvino_genai.StructuredOutputConfig(grammar=options["grammar"])
    return config


class _Group:
    """One pipeline and the requests running in it (handles by request id): the base's, or one adapter's."""

    def __init__(self, pipeline) -> None:
        self.pipeline, self.handles = pipeline, {}


class _Pipelines:
    """The child's pipelines: the base's, and one per held LoRA adapter (see the module)."""

    def __init__(self, options: dict) -> None:
        self.options = options
        self.base = _Group(_build_pipeline(options, options["ir_dir"]))
        self.adapters: OrderedDict[str, _Group] = OrderedDict()  # least recently used first
        self.loads = self.unloads = 0

    def groups(self) -> list[_Group]:
        return [self.base, *self.adapters.values()]

    def running(self) -> bool:
        return any(group.handles for group in self.groups())

    def group(self, adapter: list | None) -> _Group:
        """The group that answers with ``adapter`` ([name, weights file]; None: the base), built on first
        use; one built beyond max_adapters drops the least recently used group with no requests."""
        if adapter is None:
            return self.base
        name, weights = adapter
        if name in self.adapters:
            self.adapters.move_to_end(name)
            return self.adapters[name]
        group = _Group(_build_pipeline(self.options, self.options["adapter_ir_dir"], weights))
        idle = [held for held, other in self.adapters.items() if not other.handles]
        if len(self.adapters) >= self.options["max_adapters"] and idle:
            del self.adapters[idle[0]]  # its pipeline and KV cache are freed with it
            self.unloads += 1
        self.adapters[name] = group
        self.loads += 1
        return group

    def stop(self, request_id: int) -> None:
        for group in self.groups():
            if (handle := group.handles.pop(request_id, None)) is not None:
                handle.stop()

    def report(self) -> list:
        return ["adapters", list(self.adapters), self.loads, self.unloads]


def _take_commands(channel: Channel, pipelines: _Pipelines, block: bool) -> bool:
    """Apply the replica's messages (block for the first when idle); False once it closed the channel."""
    import numpy as np
    import openvino

    while channel.ready(None if block else 0):
        block = False
        try:
            message = channel.recv()
        except (EOFError, OSError):
            return False
        if message[0] == "add":
            _, request_id, prompt_ids, options, adapter = message
            loads = pipelines.loads
            try:
                group = pipelines.group(adapter)
                ids = openvino.Tensor(np.asarray([prompt_ids], dtype=np.int64))
                group.handles[request_id] = group.pipeline.add_request(request_id, ids, _generation_config(options))
            except Exception as exc:
                channel.send(["refused", request_id, f"{type(exc).__name__}: {exc}"])
            if pipelines.loads != loads:
                channel.send(pipelines.report())
        elif message[0] == "stop":
            pipelines.stop(message[1])
    return True


def _step(channel: Channel, group: _Group) -> None:
    """One step of the group's pipeline; report each request's new tokens and any status other than RUNNING."""
    import openvino_genai

    started, handles = time.perf_counter(), group.handles
    try:
        group.pipeline.step()
    except Exception as exc:
        for handle in handles.values():
            handle.cancel()
        channel.send(["failed", f"{type(exc).__name__}: {exc}", list(handles)])
        handles.clear()
        return
    seconds, rows, updates = time.perf_counter() - started, len(handles), []
    for request_id, handle in list(handles.items()):
        status = handle.get_status()
        tokens = []
        if handle.can_read():
            tokens = [token for output in handle.read().values() for token in output.generated_ids]
        if tokens or status != openvino_genai.GenerationStatus.RUNNING:
            updates.append([request_id, tokens, status.name])
        if status != openvino_genai.GenerationStatus.RUNNING:
            del handles[request_id]
    channel.send(["step", seconds, rows, updates])


def serve_pipeline(channel: Channel, options: dict) -> None:
    """The child's loop: build the base's pipeline, then take commands and step each pipeline with
    requests in turn."""
    try:
        pipelines = _Pipelines(options)
    except Exception as exc:
        channel.send(["error", f"{type(exc).__name__}: {exc}"])
        return
    channel.send(["ready"])
    while _take_commands(channel, pipelines, block=not pipelines.running()):
        for group in pipelines.groups():
            if group.handles:
                _step(channel, group)


if __name__ == "__main__":
    serve_pipeline(Channel(socket.socket(fileno=int(sys.argv[1]))), json.loads(sys.argv[2]))
