"""Convert a served model to OpenVINO IR once, and cache the result beside the other model copies.

``engine: openvino`` serves an IR folder: optimum-intel's exporter (``optimum-cli export openvino``,
run from its own venv, ``make openvino-venv``: it pins a transformers older than ours) turns the
Hugging Face folder into a stateful IR with int8 (or int4, or float) weights and the OpenVINO
tokenizers the pipeline needs. The result lands in the model cache under a name derived from the
folder's contents (config and weights), so a version is converted once per machine, and a
retrained model in the same folder is converted again. A half-written conversion never counts:
it is renamed into place only when the exporter succeeded.

A version whose folder is in an S3 store (``s3://bucket/store/models/RUN``, what training
registers) is converted once for all machines: the first replica to convert it keeps the IR in
the store beside the folder (``s3://bucket/store/models/RUN.openvino-int8-DIGEST``, with a
manifest of checksums like any stored folder), and a replica on another machine (or after its
cache was cleared) downloads it instead of converting: about 3x less data than the weights and
no exporter run. A replica that may not write there (a serving-only identity with read-only
access to ``store/models/``) or cannot reach the store converts locally and says so once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import time
from pathlib import Path

import ray_app
from ray_app.models import cache_lock, s3_folder
from ray_app.settings import Settings
from ray_app.storage import S3Store, StoreError, staging_dir

log = logging.getLogger(__name__)

WEIGHT_FORMATS = ("int8", "int4", "fp16", "fp32")
LORA_WEIGHTS = {"fp16": "fp16", "fp32": "fp32"}  # the served weights LoRA applies to as they are; others: fp16
IR_FILES = ("openvino_model.xml", "openvino_model.bin", "openvino_tokenizer.xml", "openvino_detokenizer.xml")
DEFAULT_CLI = Path(ray_app.__file__).resolve().parent.parent / ".venv-openvino" / "bin" / "optimum-cli"
EXPORT_TIMEOUT_S = 1800
DIGESTED = (".json", ".safetensors", ".jinja", ".model")  # what makes the model; not logs or locks


class OpenVINOExportError(RuntimeError):
    """The exporter is missing or failed; the message names what was tried."""


def _model_files(model_dir: Path) -> list[Path]:
    return [path for path in sorted(model_dir.iterdir())
            if path.is_file() and (path.suffix in DIGESTED or path.name == "merges.txt")]  # fmt: skip


def content_digest(model_dir: Path) -> str:
    """A short digest of the folder's config, tokenizer and weights: a new model gets a new IR."""
    digest = hashlib.sha256()
    for path in _model_files(model_dir):
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def remembered_digest(model_dir: Path, memo: Path) -> str:
    """:func:`content_digest`, read back from ``memo`` while the files' names, sizes and mtimes are
    unchanged (hashing the default model's 538 MB took 0.7 s of every replica's start)."""
    signature = [[path.name, stat.st_size, stat.st_mtime_ns] for path in _model_files(model_dir)
                 for stat in [path.stat()]]  # fmt: skip
    try:
        known = json.loads(memo.read_text())
    except (OSError, ValueError):
        known = {}
    entry = known.get(str(model_dir.resolve()))
    if isinstance(entry, dict) and entry.get("signature") == signature:
        return str(entry["digest"])
    digest = content_digest(model_dir)
    known[str(model_dir.resolve())] = {"signature": signature, "digest": digest}
    partial = memo.with_name(f".{memo.name}.{os.getpid()}")
    partial.write_text(json.dumps(known))
    partial.replace(memo)  # atomic: a reader sees the old memo or the new one; a racing writer may drop an entry
    return digest


def export_cli(settings: Settings) -> Path:
    cli = settings.openvino_export_cli or DEFAULT_CLI
    if not Path(cli).is_file():
        raise OpenVINOExportError(
            f"engine: openvino needs optimum-intel's exporter and there is none at {cli}: run `make openvino-venv` "
            "or set openvino_export_cli (LLMOPS_OPENVINO_EXPORT_CLI) to an optimum-cli with optimum-intel"
        )
    return Path(cli)


def openvino_model(model_dir: Path, settings: Settings, weights: str = "int8", source: str | None = None) -> Path:
    """The IR folder of ``model_dir`` with ``weights`` (see WEIGHT_FORMATS): from the local cache, else
    from the store beside ``source`` (the folder's s3:// URI, if it came from one), else converted
    here (and then kept in that store)."""
    if weights not in WEIGHT_FORMATS:
        raise OpenVINOExportError(f"openvino weights {weights!r}: expected one of {', '.join(WEIGHT_FORMATS)}")
    cache_dir = settings.model_cache_dir
    assert cache_dir is not None  # filled by the settings validator
    (cache_dir / "openvino").mkdir(parents=True, exist_ok=True)
    digest = remembered_digest(model_dir, cache_dir / "openvino" / "digests.json")
    suffix = f".openvino-{weights}-{digest}"
    target = cache_dir / "openvino" / f"{model_dir.name}{suffix}"
    if _is_complete(target):
        return target
    with cache_lock(target.parent, target.name):
        if not _is_complete(target):
            stored = StoredIR(source, suffix, settings) if source and source.startswith("s3://") else None
            if stored is None or not stored.fetch(target):
                cli = export_cli(settings)
                with staging_dir(target) as staging:
                    _export(cli, model_dir, staging, weights)
                if stored is not None:
                    stored.keep(target)
    return target


def lora_base_model(model_dir: Path, settings: Settings, weights: str = "int8", source: str | None = None) -> Path:
    """The IR that LoRA adapters are applied to when the served one has ``weights``: the same one when
    they are uncompressed, else an fp16 copy (OpenVINO GenAI's LoRA does not match int8- or
    int4-compressed weights: measured, its tensors are then left unused and the base answers)."""
    return openvino_model(model_dir, settings, LORA_WEIGHTS.get(weights, "fp16"), source)


class StoredIR:
    """Where a stored model folder's IR is kept in its store: beside it, named by weights and digest."""

    def __init__(self, source: str, suffix: str, settings: Settings):
        bucket, key = s3_folder(source)
        self.store = S3Store(f"s3://{bucket}", settings)
        self.key = f"{key.rstrip('/')}{suffix}"

    def fetch(self, target: Path) -> bool:
        """Download the IR into ``target`` (checksummed); False when there is none or it cannot be read."""
        try:
            if self.store.read_manifest(self.key) is None:
                return False
            self.store.download_dir(self.key, target, progress=False)
        except StoreError as exc:
            log.warning("cannot read the converted model at %s (%s); converting here", self.store.uri(self.key), exc)
            return False
        log.info("downloaded the converted model from %s", self.store.uri(self.key))
        return True

    def keep(self, folder: Path) -> None:
        """Upload the IR converted here, for the other machines; a refusal (read-only) is only logged."""
        try:
            self.store.upload_dir(folder, self.key, progress=False)
        except StoreError as exc:
            log.warning(
                "could not keep the converted model in the store at %s (%s): each machine converts it once",
                self.store.uri(self.key),
                exc,
            )
            return
        log.info("kept the converted model in the store at %s", self.store.uri(self.key))


def _is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in IR_FILES)


def _export(cli: Path, model_dir: Path, out_dir: Path, weights: str) -> None:
    argv = [str(cli), "export", "openvino", "--model", str(model_dir), "--task", "text-generation-with-past"]
    argv += ["--weight-format", weights]
    if weights == "int4":
        # Group size must divide the hidden size (SmolLM2-135M's 576 is not a multiple of 128).
        argv += ["--group-size", "64", "--ratio", "1.0"]
    argv.append(str(out_dir))
    # Nothing of ours goes to the exporter: no credentials, offline (the folder is all it needs).
    env = {key: os.environ[key] for key in ("PATH", "HOME", "LANG", "TMPDIR") if key in os.environ}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="2")
    started = time.monotonic()
    log.info("converting %s to OpenVINO IR (%s weights) into %s", model_dir, weights, out_dir)
    try:
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=EXPORT_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise OpenVINOExportError(f"exporting {model_dir} to OpenVINO took over {EXPORT_TIMEOUT_S}s") from None
    if done.returncode != 0 or not _is_complete(out_dir):
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
        raise OpenVINOExportError(f"{cli} could not export {model_dir} (exit {done.returncode}):\n{tail}")
    log.info("converted %s to OpenVINO in %.1fs", model_dir, time.monotonic() - started)
