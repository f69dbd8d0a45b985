"""LoRA adapters of a registered base version, served on that base unmerged.

Where they live: the adapters of registry version NAME/VERSION are folders in the store under
``adapters/NAME/VERSION/<adapter>/`` (PEFT's ``adapter_config.json`` and
``adapter_model.safetensors``, uploaded with the store's manifest like any model folder, so a
half-written one is never listed). Clients pick one with ``model: "<served name>:<adapter>"``
(Ray Serve LLM's convention); a replica fetches it on first use into the model cache, verified
against the manifest.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ray_app.settings import Settings
from ray_app.storage import MANIFEST, open_store

SEPARATOR = ":"
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# Tags on the base registry version: the run that trained each adapter, where each alias points, and
# each adapter's lineage (JSON: what it was trained on, as a version's own tags say for a version).
RUN_TAG, ALIAS_TAG, LINEAGE_TAG = "llmops.adapter.", "llmops.adapter_alias.", "llmops.adapter_lineage."


class AdapterNotFound(LookupError):
    """No complete adapter of that name is stored for the base version; the message names where it looked."""


def split_model_id(model: str) -> tuple[str, str | None]:
    """``"base:adapter"`` -> ``("base", "adapter")``; a plain name -> ``(name, None)``."""
    base, separator, adapter = model.partition(SEPARATOR)
    return base, (adapter if separator else None)


def adapter_card(card: dict, base: str, adapter: str) -> dict:
    """The ``/v1/models`` card of ``base:adapter`` (an adapter or an alias): the base's ``card``, its id that
    model, and vLLM's ``root``/``parent`` naming the base."""
    return {**card, "id": f"{base}{SEPARATOR}{adapter}", "root": base, "parent": base}


def adapters_prefix(registry_name: str, version: str) -> str:
    """The store folder holding the adapters of registry version ``registry_name``/``version``."""
    return f"adapters/{registry_name}/{version}"


def adapter_key(registry_name: str, version: str, adapter: str) -> str:
    """The store folder of one adapter of registry version ``registry_name``/``version``."""
    return f"{adapters_prefix(registry_name, version)}/{adapter}"


def run_tag(adapter: str) -> str:
    """The base version's tag naming the MLflow run that trained ``adapter``."""
    return f"{RUN_TAG}{adapter}"


def alias_tag(alias: str) -> str:
    """The base version's tag naming the adapter ``NAME:ALIAS`` is answered by (moved by a promotion)."""
    return f"{ALIAS_TAG}{alias}"


def lineage_tag(adapter: str) -> str:
    """The base version's tag holding ``adapter``'s lineage (a JSON object of tags)."""
    return f"{LINEAGE_TAG}{adapter}"


def lineages(tags: dict[str, str]) -> dict[str, dict[str, str]]:
    """``{adapter: lineage}`` recorded on a base version's ``tags`` (unreadable ones are skipped)."""
    found = {}
    for adapter, value in tagged(tags, LINEAGE_TAG).items():
        try:
            lineage = json.loads(value)
        except ValueError:
            continue
        if isinstance(lineage, dict):
            found[adapter] = lineage
    return found


def tagged(tags: dict[str, str], prefix: str) -> dict[str, str]:
    """``{suffix: value}`` of the version ``tags`` under ``prefix`` (RUN_TAG: runs, ALIAS_TAG: aliases)."""
    return {key[len(prefix) :]: value for key, value in tags.items() if key.startswith(prefix) and value}


def check_adapter_name(adapter: str) -> str:
    if not ADAPTER_NAME.match(adapter):
        raise ValueError(f"adapter name {adapter!r}: 1-64 letters, digits, '.', '_' or '-', not starting with a symbol")
    return adapter


def publish_adapter(folder: Path, registry_name: str, version: str, adapter: str, settings: Settings) -> str:
    """Upload a PEFT adapter folder as ``adapter`` of the base version; returns its store URI. Adapters
    are immutable: a name already taken is refused."""
    check_adapter_name(adapter)
    missing = [name for name in ADAPTER_FILES if not (Path(folder) / name).is_file()]
    if missing:
        raise ValueError(f"{folder}: not a PEFT adapter folder (missing {', '.join(missing)})")
    store = open_store(settings=settings)
    key = adapter_key(registry_name, version, adapter)
    if store.read_manifest(key) is not None:  # replicas cache adapters by name: a name is never reused
        raise ValueError(f"{registry_name}/{version} already has an adapter named {adapter!r} ({store.uri(key)})")
    store.upload_dir(folder, key, progress=False)
    return store.uri(key)


def list_adapters(registry_name: str, version: str, settings: Settings) -> list[str]:
    """The names of the complete adapters stored for the base version, sorted."""
    prefix = adapters_prefix(registry_name, version) + "/"
    keys = [info.key for info in open_store(settings=settings).list(prefix)]
    return sorted(key[len(prefix) :].split("/")[0] for key in keys if key.endswith(f"/{MANIFEST}"))


def fetch_adapter(registry_name: str, version: str, adapter: str, settings: Settings) -> Path:
    """A local copy of the adapter (downloaded once into the model cache, checksums verified).

    Raises AdapterNotFound when no complete adapter of that name is stored.
    """
    check_adapter_name(adapter)
    key = adapter_key(registry_name, version, adapter)
    assert settings.model_cache_dir is not None  # filled by the settings validator
    local = Path(settings.model_cache_dir) / "adapters" / registry_name / version / adapter
    if (local / MANIFEST).is_file():
        return local
    store = open_store(settings=settings)
    if store.read_manifest(key) is None:  # missing or half-written (a store that cannot be reached raises)
        raise AdapterNotFound(f"no adapter {adapter!r} of {registry_name}/{version} at {store.uri(key)}")
    return store.download_dir(key, local, progress=False)
