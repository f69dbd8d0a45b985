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
"""

from __future__ import annotations

import json
import logging
import os
import random
import select
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from ray_app.serving.engine import GREEDY_BELOW, DecodeLoop, Delta, GenerationRequest, Row, TextEngine, ended_early
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


class OpenVINOEngine(TextEngine):
    """An OpenVINO IR folder (from :func:`ray_app.serving.openvino_export.openvino_model`) in a
    ContinuousBatchingPipeline in a child process, with the folder's Hugging Face tokenizer here
    for prompts and text."""

    def __init__(
        self,
        ir_dir: Path,
        threads: int | None = None,
        max_batch_size: int = 8,
        kv_cache_gb: int = 1,
        prefix_cache: bool = True,
        precision: str = "auto",
    ):
        config = json.loads((ir_dir / "config.json").read_text())
        self.model_dir = ir_dir
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
        """Hand ``request`` to the pipeline (its tokens come back in "step" messages)."""
        self.channel.send(["add", request_id, request.prompt_ids, sampling_options(request, self.eos_ids)])

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
        elif message[0] == "failed":
            log.error("an OpenVINO pipeline step failed: %s", message[1])
            self._fail_all(RuntimeError(f"generation failed: {message[1]}"))
        return True

    def _admit(self) -> None:
        """Move waiting rows into the pipeline while it has room (ended ones are told and dropped)."""
        for row in self._take(self.max_batch_size - len(self._rows)):
            self._next_id += 1
            self.engine.add(self._next_id, row.request)
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
def _build_pipeline(options: dict):
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
    return openvino_genai.ContinuousBatchingPipeline(options["ir_dir"], scheduler, "CPU", properties)


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


def _take_commands(channel: Channel, pipeline, handles: dict, block: bool) -> bool:
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
            _, request_id, prompt_ids, options = message
            try:
                ids = openvino.Tensor(np.asarray([prompt_ids], dtype=np.int64))
                handles[request_id] = pipeline.add_request(request_id, ids, _generation_config(options))
            except Exception as exc:
                channel.send(["refused", request_id, str(exc)])
        elif message[0] == "stop" and (handle := handles.pop(message[1], None)) is not None:
            handle.stop()
    return True


def _step(channel: Channel, pipeline, handles: dict) -> None:
    """One pipeline step; report each request's new tokens and any status other than RUNNING."""
    import openvino_genai

    started = time.perf_counter()
    try:
        pipeline.step()
    except Exception as exc:
        for handle in handles.values():
            handle.cancel()
        handles.clear()
        channel.send(["failed", f"{type(exc).__name__}: {exc}"])
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
    """The child's loop: build the pipeline, then take commands and step while requests run."""
    try:
        pipeline = _build_pipeline(options)
    except Exception as exc:
        channel.send(["error", f"{type(exc).__name__}: {exc}"])
        return
    channel.send(["ready"])
    handles: dict = {}
    while _take_commands(channel, pipeline, handles, block=not handles):
        if handles:
            _step(channel, pipeline, handles)


if __name__ == "__main__":
    serve_pipeline(Channel(socket.socket(fileno=int(sys.argv[1]))), json.loads(sys.argv[2]))
