"""Signed checkpoints: a resumed run loads only files this platform's training wrote.

DeepSpeed saves its shards with ``torch.save`` and loads them with
``torch.load(weights_only=False)``: unpickling runs whatever code a file names. Checkpoints
live in a shared store (S3, a folder) that more people and services can write than should run
code inside a training worker. So each rank writes, beside its shard, a manifest of its files'
SHA-256 digests signed with HMAC-SHA256 under a key from settings
(``LLMOPS_CHECKPOINT_SIGNING_KEY`` on the nodes; else one generated once into the stack dir,
mode 0600). Before DeepSpeed loads a checkpoint, :func:`verify` checks every manifest's
signature, every listed file's digest, and that no file is unlisted: anything else raises
:class:`CheckpointRejected` and nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path

from ray_app.credentials import generated_secret
from ray_app.settings import Settings

MANIFEST_PREFIX = "_signed_manifest.rank"
FORMAT = 1


class CheckpointRejected(RuntimeError):
    """A checkpoint's files are not the ones its signed manifests describe; it is not loaded."""


def signing_key(settings: Settings) -> bytes:
    """The HMAC key: ``checkpoint_signing_key`` from settings, else the stack's generated one."""
    if settings.checkpoint_signing_key is not None:
        return settings.checkpoint_signing_key.get_secret_value().encode()
    return generated_secret(settings.stack_dir / "checkpoint_signing_key").encode()


def _digest(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def _signature(body: dict, key: bytes) -> str:
    return hmac.new(key, json.dumps(body, sort_keys=True).encode(), hashlib.sha256).hexdigest()


def _is_manifest(path: Path) -> bool:
    return path.name.startswith(MANIFEST_PREFIX) and path.suffix == ".json"


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and not _is_manifest(p))


def sign(folder: Path, key: bytes, rank: int) -> Path:
    """Write this rank's signed manifest of every file under ``folder`` (call after saving)."""
    folder = Path(folder)
    body = {"format": FORMAT, "rank": rank, "files": {name: _digest(folder / name) for name in _files(folder)}}
    path = folder / f"{MANIFEST_PREFIX}{rank}.json"
    path.write_text(json.dumps({**body, "signature": _signature(body, key)}, indent=1, sort_keys=True))
    return path


def verify(folder: Path, key: bytes) -> int:
    """Check a (merged) checkpoint folder against its signed manifests; returns the files verified.

    Raises CheckpointRejected naming the first problem: no manifest, a bad signature, a file
    whose digest differs, a listed file missing, or a file no manifest lists.
    """
    folder = Path(folder)
    manifests = sorted(path for path in folder.iterdir() if _is_manifest(path))
    if not manifests:
        raise CheckpointRejected(f"checkpoint {folder} has no signed manifest; refusing to load it")
    listed: dict[str, str] = {}
    for path in manifests:
        try:
            manifest = json.loads(path.read_text())
            body = {key_: manifest[key_] for key_ in ("format", "rank", "files")}
            claimed = str(manifest["signature"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointRejected(f"checkpoint manifest {path.name} is unreadable ({exc}); not loading") from None
        if not hmac.compare_digest(_signature(body, key), claimed):
            raise CheckpointRejected(
                f"checkpoint manifest {path.name} in {folder} has a bad signature (altered, or signed with "
                "another checkpoint_signing_key); refusing to load it"
            )
        for name, digest in body["files"].items():
            if listed.setdefault(name, digest) != digest:
                raise CheckpointRejected(f"checkpoint manifests disagree about {name}; refusing to load")
    present = set(_files(folder))
    unlisted = sorted(present - set(listed))
    if unlisted:
        raise CheckpointRejected(f"checkpoint {folder} holds files no signed manifest lists: {unlisted[:5]}")
    for name, digest in listed.items():
        if name not in present:
            raise CheckpointRejected(f"checkpoint {folder} lacks {name}, which its signed manifest lists")
        if not hmac.compare_digest(_digest(folder / name), digest):
            raise CheckpointRejected(f"{name} in checkpoint {folder} was modified after it was signed; not loading")
    return len(listed)
