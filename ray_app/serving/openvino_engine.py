"""The OpenVINO engine: OpenVINO GenAI's continuous batching pipeline behind our batcher's interface.

On CPU it is the fast engine (measured side by side with ours and `model.generate`:
``benchmarks/serve_throughput.py``): weight-only int8 (or int4) matmuls on AMX/AVX-512, paged
attention, and a prefix cache, so a conversation's next turn reuses the KV of the turns before it
and its time to first token does not grow with the history.

:class:`OpenVINOBatcher` is what a replica drives, with :class:`~ray_app.serving.engine.ContinuousBatcher`'s
interface (``submit``, ``occupancy``, ``stats``, ``stop``): one thread owns the pipeline, adds
arriving requests to it, steps it, and turns each request's new tokens into
:class:`~ray_app.serving.engine.Delta` s with the same text rules as the transformers engine (stop
strings held back until they cannot match, partial UTF-8 held back, the token budget, cancelled
and past-deadline rows dropped at the next step). Per-request sampling (temperature, top-p,
seed) is the pipeline's own; stop strings are ours (the row is stopped when one appears).

The model is the IR :mod:`ray_app.serving.openvino_export` converts once per model and caches.
"""

from __future__ import annotations

import logging
import queue
import random
import time
from collections.abc import Callable
from pathlib import Path

from ray_app.serving.engine import GREEDY_BELOW, DecodeLoop, Delta, GenerationRequest, Row, TextEngine, ended_early

log = logging.getLogger(__name__)

PRECISIONS = {"auto": None, "f32": "f32", "bf16": "bf16"}  # INFERENCE_PRECISION_HINT; auto: bf16 where AMX


class OpenVINOEngine(TextEngine):
    """An OpenVINO IR folder (from :func:`ray_app.serving.openvino_export.openvino_model`) in a
    ContinuousBatchingPipeline, with the folder's Hugging Face tokenizer for prompts and text."""

    def __init__(
        self,
        ir_dir: Path,
        threads: int | None = None,
        max_batch_size: int = 8,
        kv_cache_gb: float = 1.0,
        prefix_cache: bool = True,
        precision: str = "auto",
    ):
        import openvino_genai
        from transformers import AutoConfig

        super().__init__(ir_dir)
        self.model_dir = ir_dir
        self.prepacked = 0  # the transformers engine's counter; nothing to prepack here
        config = AutoConfig.from_pretrained(ir_dir)
        self.context_length = int(getattr(config, "max_position_embeddings", 2048))
        scheduler = openvino_genai.SchedulerConfig()
        scheduler.cache_size = max(1, round(kv_cache_gb))  # GB of KV blocks shared by running and cached prefixes
        scheduler.enable_prefix_caching = prefix_cache
        scheduler.max_num_seqs = max_batch_size
        scheduler.max_num_batched_tokens = max(self.context_length, 256)
        properties: dict[str, object] = {}
        if threads:
            properties["INFERENCE_NUM_THREADS"] = threads
        if PRECISIONS[precision]:
            properties["INFERENCE_PRECISION_HINT"] = PRECISIONS[precision]
        self.pipeline = openvino_genai.ContinuousBatchingPipeline(str(ir_dir), scheduler, "CPU", properties)

    def generation_config(self, request: GenerationRequest):
        """The pipeline's sampling settings for ``request``: greedy below GREEDY_BELOW, else its own draw."""
        import openvino_genai

        params = request.params
        config = openvino_genai.GenerationConfig()
        config.max_new_tokens = params.max_tokens
        config.stop_token_ids = set(self.eos_ids)
        if params.temperature < GREEDY_BELOW:
            config.do_sample = False
        else:
            config.do_sample = True
            config.temperature = params.temperature
            config.top_p = params.top_p
            # The pipeline's default seed is one constant: unseeded requests draw their own.
            config.rng_seed = params.seed if params.seed is not None else random.getrandbits(32)
        return config

    def add(self, request_id: int, request: GenerationRequest):
        """Hand ``request`` to the pipeline; returns its GenerationHandle."""
        import numpy as np
        import openvino

        if not request.prompt_ids:
            raise ValueError("a generation request needs at least one prompt token")
        ids = openvino.Tensor(np.asarray([request.prompt_ids], dtype=np.int64))
        return self.pipeline.add_request(request_id, ids, self.generation_config(request))


class _Running:
    """A request inside the pipeline: its text state and the pipeline's handle."""

    def __init__(self, row: Row, handle):
        self.row, self.handle = row, handle


class OpenVINOBatcher(DecodeLoop):
    """Drives an OpenVINOEngine from one thread, with ContinuousBatcher's interface (see DecodeLoop).

    At most ``max_batch_size`` requests are in the pipeline; more wait in arrival order, and are
    dropped there when cancelled or past their deadline.
    """

    thread_name = "openvino-batcher"

    def __init__(self, engine: OpenVINOEngine | Callable[[], OpenVINOEngine], max_batch_size: int = 8):
        self._running: list[_Running] = []
        self._next_id = 0
        super().__init__(engine, max_batch_size)

    # --- the loop (its own thread) ---------------------------------------------------------
    def _loop(self) -> None:
        while not self._stopped.is_set():
            try:
                if not self._running and not self._admit(block=True):
                    continue
                self._admit(block=False)
                started = time.perf_counter()
                self.engine.pipeline.step()
                self.stats.decode_steps += 1
                self.stats.decode_rows += len(self._running)
                self.stats.decode_seconds += time.perf_counter() - started
                self._running = [running for running in self._running if self._collect(running)]
            except Exception as exc:  # a failed step fails the requests in the pipeline, not the loop
                log.exception("generation failed")
                for running in self._running:
                    running.handle.cancel()
                    running.row.emit(exc)
                self._running = []
            self.running = len(self._running)

    def _admit(self, block: bool) -> bool:
        """Move waiting rows into the pipeline while it has room; True if any moved."""
        moved = False
        while len(self._running) < self.max_batch_size:
            try:
                row = self._waiting.get(timeout=0.5) if block and not moved else self._waiting.get_nowait()
            except queue.Empty:
                break
            if self._ended_in_queue(row):
                continue
            self._next_id += 1
            try:
                handle = self.engine.add(self._next_id, row.request)
            except Exception as exc:
                log.exception("the pipeline refused a request")
                row.emit(exc)
                continue
            self.stats.prefills += 1
            self.stats.prefill_rows += 1
            self._running.append(_Running(row, handle))
            moved = True
        return moved

    def _collect(self, running: _Running) -> bool:
        """Emit what ``running`` produced in the last step; False once it is finished (and told)."""
        import openvino_genai

        row, handle = running.row, running.handle
        status = handle.get_status()
        tokens: list[int] = []
        if handle.can_read():
            for output in handle.read().values():
                tokens.extend(output.generated_ids)
        delta = None
        try:
            for token in tokens:
                delta = self.engine.advance(row, token)
                if delta.text or delta.finish_reason:
                    row.emit(delta)
                if row.done:
                    break
            if not row.done and not tokens:
                reason = ended_early(row.request)
                if reason is not None:
                    row.done, delta = True, Delta("", len(row.token_ids), reason)
                    row.emit(delta)
        except Exception as exc:
            log.exception("detokenizing failed for one row; the rest of its batch goes on")
            row.done, delta = True, None
            self.stats.failed_rows += 1
            row.emit(exc)
        if row.done:
            if delta is not None and delta.finish_reason in ("cancelled", "deadline"):
                self.stats.cancelled_rows += 1
            if status == openvino_genai.GenerationStatus.RUNNING:
                handle.stop()  # a stop string, the client left or the deadline passed: free its KV blocks
            return False
        if status == openvino_genai.GenerationStatus.RUNNING:
            return True
        # The pipeline ended it without a token we count as the end (EOS it kept, or it dropped the request).
        if status == openvino_genai.GenerationStatus.FINISHED:
            row.emit(Delta("", len(row.token_ids), "stop"))
        else:
            self.stats.failed_rows += 1
            row.emit(RuntimeError(f"the OpenVINO pipeline ended the request: {status}"))
        return False
