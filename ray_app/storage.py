"""The checkpoint and model store: one interface over ``s3://`` (MinIO or any S3) and local paths.

Object operations use the MinIO SDK; Ray Train gets a ``pyarrow.fs`` filesystem with the
endpoint override (:meth:`Store.ray_storage`). A directory upload ends by writing
``_manifest.json`` (size and SHA-256 of every file): its presence marks a complete upload,
and downloads verify every file against it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from ray_app.settings import Settings, check_store_uri, get_settings

if TYPE_CHECKING:
    import pyarrow.fs

MANIFEST = "_manifest.json"
_HASH_CHUNK = 1 << 20


class StoreError(RuntimeError):
    """A store operation failed; the message names the URI or endpoint involved."""


class IntegrityError(StoreError):
    """A transferred file does not match the size or checksum recorded in the manifest."""


@dataclass(frozen=True)
class ObjectInfo:
    """One stored file: its key relative to the store root, and its size in bytes."""

    key: str
    size: int


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _local_files(root: Path) -> list[tuple[str, Path]]:
    if not root.is_dir():
        raise StoreError(f"not a directory: {root}")
    files = [(path.relative_to(root).as_posix(), path) for path in sorted(root.rglob("*")) if path.is_file()]
    return [(rel, path) for rel, path in files if rel != MANIFEST]


def _build_manifest(files: list[tuple[str, Path]]) -> dict[str, dict[str, int | str]]:
    return {rel: {"size": path.stat().st_size, "sha256": file_sha256(path)} for rel, path in files}


_SHA256 = frozenset("0123456789abcdef")


def validate_manifest(data: object, where: str) -> dict[str, dict[str, int | str]]:
    """``data`` as a manifest, or IntegrityError naming ``where`` and the bad entry.

    Every key must be a relative POSIX path inside the folder (no ``..``, no absolute path,
    no drive or backslash, no empty part): a crafted manifest must not make a download write
    outside its target folder.
    """
    if not isinstance(data, dict):
        raise IntegrityError(f"{where}: the manifest is not a JSON object")
    for rel, entry in data.items():
        parts = rel.split("/") if isinstance(rel, str) else [""]
        if rel == MANIFEST or "\\" in rel or ":" in parts[0] or any(part in ("", ".", "..") for part in parts):
            raise IntegrityError(f"{where}: the manifest names an unsafe path {rel!r}")
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("size"), int)
            and entry["size"] >= 0
            and isinstance(entry.get("sha256"), str)
            and len(entry["sha256"]) == 64
            and set(entry["sha256"]) <= _SHA256
        ):
            raise IntegrityError(f"{where}: the manifest entry for {rel!r} needs a size and a SHA-256")
    return data


def verify_folder(folder: Path) -> dict[str, dict[str, int | str]]:
    """Check every file of a downloaded ``folder`` against its ``_manifest.json``; returns the manifest.

    Raises IntegrityError naming the first missing or changed file (or a missing manifest).
    """
    path = Path(folder) / MANIFEST
    try:
        manifest = validate_manifest(json.loads(path.read_text()), str(path))
    except (OSError, ValueError) as exc:
        raise IntegrityError(f"{path}: no readable manifest ({exc})") from exc
    for rel, entry in manifest.items():
        local = Path(folder) / rel
        if not local.is_file() or local.stat().st_size != entry["size"] or file_sha256(local) != entry["sha256"]:
            raise IntegrityError(f"{local}: missing or different from its manifest")
    return manifest


def _join(*parts: str) -> str:
    return "/".join(part.strip("/") for part in parts if part and part.strip("/"))


@contextmanager
def _progress(description: str, total: int, enabled: bool) -> Iterator[Callable[[int], None]]:
    if not enabled:
        yield lambda _n: None
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


@contextmanager
def staging_dir(target: Path) -> Iterator[Path]:
    """A temp dir beside ``target``, renamed onto it only if the block succeeds: ``target`` is
    either complete or untouched, also for readers in other processes."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield staging
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


class Store(ABC):
    """A place for checkpoints and models, addressed by keys relative to its root URI."""

    root_uri: str

    @abstractmethod
    def ensure(self) -> None:
        """Create the bucket or directory behind the root if it does not exist."""

    @abstractmethod
    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Every file under ``prefix`` (recursive), keys relative to the root, sorted."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Delete every file under ``prefix``; returns how many were deleted."""

    @abstractmethod
    def _put_file(self, local: Path, key: str, advance: Callable[[int], None]) -> None: ...

    @abstractmethod
    def _get_file(self, key: str, local: Path, advance: Callable[[int], None]) -> None: ...

    @abstractmethod
    def _read_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def _write_bytes(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def _stat_size(self, key: str) -> int | None: ...

    @abstractmethod
    def _delete_file(self, key: str) -> None:
        """Delete one file if it exists."""

    def _clean_partials(self, prefix: str) -> None:  # noqa: B027 - only a local store leaves partial files
        """Remove what an interrupted upload under ``prefix`` left behind (local stores only)."""

    @abstractmethod
    def ray_storage(self) -> tuple[str, pyarrow.fs.FileSystem | None]:
        """``(storage_path, storage_filesystem)`` for Ray Train's ``RunConfig``."""

    max_workers: int = 4

    def uri(self, key: str = "") -> str:
        """The full URI of a key under this store."""
        return _join(self.root_uri, key) if key else self.root_uri

    def exists(self, key: str) -> bool:
        """Whether a file exists at ``key``."""
        return self._stat_size(key) is not None

    def read_manifest(self, prefix: str) -> dict[str, dict[str, int | str]] | None:
        """The manifest of a directory uploaded under ``prefix``, or None if it is incomplete.

        Raises IntegrityError if the manifest is not valid JSON or names an unsafe path.
        """
        where = self.uri(_join(prefix, MANIFEST))
        try:
            raw = self._read_bytes(_join(prefix, MANIFEST))
        except FileNotFoundError:
            return None
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise IntegrityError(f"{where}: the manifest is not valid JSON ({exc})") from exc
        return validate_manifest(data, where)

    def upload_dir(self, local_dir: str | Path, prefix: str, progress: bool = True) -> dict[str, dict[str, int | str]]:
        """Upload every file of ``local_dir`` under ``prefix``, verify sizes, then write the manifest.

        Large files go up in multipart chunks; files are sent in parallel. Returns the manifest.
        Raises IntegrityError if a stored size differs from the local one.

        Overwriting a folder first removes its manifest, so a reader (or a killed upload) sees
        it as incomplete, never as a mix of old and new files; files of the old folder that the
        new one lacks are removed after the new manifest is written.
        """
        files = _local_files(Path(local_dir))
        manifest = _build_manifest(files)
        self._delete_file(_join(prefix, MANIFEST))
        self._clean_partials(prefix)
        total = sum(int(entry["size"]) for entry in manifest.values())
        with _progress(f"upload {Path(local_dir).name}", total, progress) as advance:
            self._parallel(lambda item: self._put_file(item[1], _join(prefix, item[0]), advance), files)
        for rel, entry in manifest.items():
            stored = self._stat_size(_join(prefix, rel))
            if stored != entry["size"]:
                raise IntegrityError(f"{self.uri(_join(prefix, rel))}: stored {stored} bytes, expected {entry['size']}")
        self._write_bytes(_join(prefix, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True).encode())
        keep = {_join(prefix, rel) for rel in manifest} | {_join(prefix, MANIFEST)}
        for info in self.list(prefix):
            if info.key not in keep:
                self._delete_file(info.key)
        return manifest

    def download_dir(self, prefix: str, local_dir: str | Path, progress: bool = True) -> Path:
        """Download a directory uploaded with :meth:`upload_dir` and verify every file's checksum.

        Writes into a sibling temp dir and renames it into place, so ``local_dir`` is either
        complete or untouched. Raises StoreError if there is no manifest (incomplete or missing
        upload), IntegrityError on a checksum mismatch.
        """
        manifest = self.read_manifest(prefix)
        if manifest is None:
            raise StoreError(f"no complete upload at {self.uri(prefix)} (missing {MANIFEST})")
        target = Path(local_dir)
        with staging_dir(target) as staging:
            total = sum(int(entry["size"]) for entry in manifest.values())
            with _progress(f"download {Path(prefix).name or prefix}", total, progress) as advance:
                self._parallel(lambda rel: self._get_file(_join(prefix, rel), staging / rel, advance), list(manifest))
            for rel, entry in manifest.items():
                if file_sha256(staging / rel) != entry["sha256"]:
                    raise IntegrityError(f"{self.uri(_join(prefix, rel))}: checksum mismatch after download")
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        return target

    def _parallel(self, func: Callable, items: list) -> None:
        if len(items) <= 1 or self.max_workers == 1:
            for item in items:
                func(item)
            return
        with ThreadPoolExecutor(max_workers=self.max_workers) as pool:
            for future in [pool.submit(func, item) for item in items]:
                future.result()


PARTIAL = ".partial"


def _atomic_write(dest: Path, fill: Callable[[Path], None]) -> None:
    """Write ``dest`` through a unique ``.partial`` temp file: fill, fsync, rename, fsync the folder."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=PARTIAL, dir=dest.parent)
    os.close(handle)
    partial = Path(name)
    try:
        fill(partial)
        with open(partial, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(partial, dest)
    finally:
        partial.unlink(missing_ok=True)
    folder = os.open(dest.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


class LocalStore(Store):
    """A store in a local (or network-mounted) directory.

    Every file is written to a ``.partial`` temp file, fsynced and renamed into place; the
    manifest goes last, so a crash leaves either the old manifest with the old files, or no
    manifest (incomplete). ``.partial`` leftovers are not listed and are removed by the next
    upload to the same folder.
    """

    def __init__(self, root: str | Path, max_workers: int = 4) -> None:
        self.root = Path(str(root).removeprefix("file://")).expanduser().absolute()
        self.root_uri = str(self.root)
        self.max_workers = max_workers

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve() if key else self.root
        if path != self.root and self.root.resolve() not in path.parents:
            raise StoreError(f"key {key!r} escapes the store root {self.root}")
        return path

    def uri(self, key: str = "") -> str:
        return str(self.root / key.strip("/")) if key.strip("/") else self.root_uri

    def ensure(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        base = self._path(prefix)
        if base.is_file():
            return [ObjectInfo(prefix.strip("/"), base.stat().st_size)]
        if not base.is_dir():
            return []
        return [
            ObjectInfo(path.relative_to(self.root).as_posix(), path.stat().st_size)
            for path in sorted(base.rglob("*"))
            if path.is_file() and not path.name.endswith(PARTIAL)
        ]

    def delete_prefix(self, prefix: str) -> int:
        base = self._path(prefix)
        if base == self.root.resolve() and not prefix.strip("/"):
            raise StoreError("refusing to delete the whole store root; name a prefix")
        if base.is_file():
            base.unlink()
            return 1
        if not base.is_dir():
            return 0
        count = sum(1 for path in base.rglob("*") if path.is_file())
        shutil.rmtree(base)
        return count

    def _put_file(self, local: Path, key: str, advance: Callable[[int], None]) -> None:
        dest = self._path(key)
        _atomic_write(dest, lambda partial: shutil.copyfile(local, partial))
        advance(dest.stat().st_size)

    def _get_file(self, key: str, local: Path, advance: Callable[[int], None]) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self._path(key), local)
        advance(local.stat().st_size)

    def _read_bytes(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def _write_bytes(self, key: str, data: bytes) -> None:
        _atomic_write(self._path(key), lambda partial: partial.write_bytes(data))

    def _stat_size(self, key: str) -> int | None:
        path = self._path(key)
        return path.stat().st_size if path.is_file() else None

    def _delete_file(self, key: str) -> None:
        path = self._path(key)
        if not path.is_file():
            return
        path.unlink()
        for folder in path.parents:  # folders it leaves empty go too, as on S3
            if folder == self.root or self.root not in folder.parents or any(folder.iterdir()):
                break
            folder.rmdir()

    def _clean_partials(self, prefix: str) -> None:
        base = self._path(prefix)
        if base.is_dir():
            for leftover in base.rglob(f"*{PARTIAL}"):
                leftover.unlink(missing_ok=True)

    def ray_storage(self) -> tuple[str, None]:
        self.ensure()
        return str(self.root), None


def _http_client(pool_size: int):
    """Bounded retries and timeouts: a dead endpoint fails in seconds, not minutes."""
    import urllib3

    retry = urllib3.Retry(total=3, backoff_factor=0.2, status_forcelist=(500, 502, 503, 504))
    timeout = urllib3.Timeout(connect=10, read=300)
    return urllib3.PoolManager(timeout=timeout, retries=retry, maxsize=max(pool_size, 10))


class S3Store(Store):
    """A store under ``s3://bucket/prefix`` on MinIO or any S3-compatible endpoint."""

    def __init__(self, uri: str, settings: Settings) -> None:
        from minio import Minio

        parsed = urlparse(uri)
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.root_uri = f"s3://{_join(self.bucket, self.prefix)}"
        self.settings = settings
        self.max_workers = settings.s3_transfer_threads
        self.part_size = settings.s3_part_size_mb * 1024 * 1024
        endpoint = settings.s3_endpoint_url or f"https://s3.{settings.aws_region}.amazonaws.com"
        self.endpoint_url = endpoint
        ep = urlparse(endpoint)
        access, secret = settings.s3_credentials()
        self.client = Minio(
            ep.netloc,
            access_key=access,
            secret_key=secret,
            secure=ep.scheme == "https",
            region=settings.aws_region,
            http_client=_http_client(self.max_workers),
        )

    def _key(self, key: str) -> str:
        return _join(self.prefix, key)

    def _rel(self, object_name: str) -> str:
        return object_name[len(self.prefix) + 1 :] if self.prefix else object_name

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        from minio.error import S3Error
        from urllib3.exceptions import HTTPError

        try:
            yield
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject"):
                raise FileNotFoundError(what) from exc
            raise StoreError(f"S3 {exc.code} on {what} at {self.endpoint_url}: {exc.message}") from exc
        except (HTTPError, OSError) as exc:
            if isinstance(exc, FileNotFoundError):
                raise
            raise StoreError(f"cannot reach the S3 endpoint {self.endpoint_url} ({what}): {exc}") from exc

    def ensure(self) -> None:
        with self._errors(f"bucket {self.bucket}"):
            if not self.client.bucket_exists(self.bucket):
                self.client.make_bucket(self.bucket)

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        base = self._key(prefix)
        with self._errors(self.uri(prefix)):
            objects = self.client.list_objects(self.bucket, prefix=base + "/" if base else None, recursive=True)
            found = [ObjectInfo(self._rel(obj.object_name), obj.size or 0) for obj in objects if not obj.is_dir]
            if not found and base and self._stat_size(prefix) is not None:
                found = [ObjectInfo(prefix.strip("/"), int(self._stat_size(prefix) or 0))]
        return sorted(found, key=lambda info: info.key)

    def delete_prefix(self, prefix: str) -> int:
        from minio.deleteobjects import DeleteObject

        if not self._key(prefix):
            raise StoreError("refusing to delete the whole bucket; name a prefix")
        names = [self._key(info.key) for info in self.list(prefix)]
        with self._errors(self.uri(prefix)):
            errors = list(self.client.remove_objects(self.bucket, (DeleteObject(name) for name in names)))
        if errors:
            raise StoreError(f"could not delete {len(errors)} objects under {self.uri(prefix)}: {errors[0]}")
        return len(names)

    def _put_file(self, local: Path, key: str, advance: Callable[[int], None]) -> None:
        with self._errors(self.uri(key)):
            self.client.fput_object(self.bucket, self._key(key), str(local), part_size=self.part_size)
        advance(local.stat().st_size)

    def _get_file(self, key: str, local: Path, advance: Callable[[int], None]) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        with self._errors(self.uri(key)):
            self.client.fget_object(self.bucket, self._key(key), str(local))
        advance(local.stat().st_size)

    def _read_bytes(self, key: str) -> bytes:
        with self._errors(self.uri(key)):
            response = self.client.get_object(self.bucket, self._key(key))
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()

    def _write_bytes(self, key: str, data: bytes) -> None:
        import io

        with self._errors(self.uri(key)):
            self.client.put_object(self.bucket, self._key(key), io.BytesIO(data), len(data))

    def _stat_size(self, key: str) -> int | None:
        try:
            with self._errors(self.uri(key)):
                return self.client.stat_object(self.bucket, self._key(key)).size
        except FileNotFoundError:
            return None

    def _delete_file(self, key: str) -> None:
        with self._errors(self.uri(key)):
            self.client.remove_object(self.bucket, self._key(key))  # S3 deletes are idempotent

    def ray_storage(self) -> tuple[str, pyarrow.fs.FileSystem]:
        import pyarrow.fs

        access, secret = self.settings.s3_credentials()
        ep = urlparse(self.endpoint_url)
        filesystem = pyarrow.fs.S3FileSystem(
            endpoint_override=ep.netloc,
            scheme=ep.scheme,
            region=self.settings.aws_region,
            access_key=access,
            secret_key=secret,
        )
        # With an explicit filesystem Ray wants "bucket/key", never "s3://bucket/key".
        return _join(self.bucket, self.prefix), filesystem


def pyarrow_location(uri: str, settings: Settings | None = None) -> tuple[str, pyarrow.fs.FileSystem | None]:
    """``(path, filesystem)`` for reading a file or folder URI with pyarrow or Ray Data.

    ``s3://bucket/key`` gets an S3 filesystem on the configured endpoint and ``bucket/key``;
    a local path gets ``(absolute path, None)``.
    """
    settings = settings or get_settings()
    if uri.startswith("s3://"):
        bucket, _, key = uri[len("s3://") :].partition("/")
        path, filesystem = S3Store(f"s3://{bucket}", settings).ray_storage()
        return _join(path, key), filesystem
    check_store_uri(uri)
    return str(Path(uri.removeprefix("file://")).expanduser().absolute()), None


def open_store(uri: str | None = None, settings: Settings | None = None) -> Store:
    """The store at ``uri`` (default: ``settings.store_uri``): ``s3://bucket/prefix`` or a local path.

    Raises ValueError naming the accepted forms for any other scheme.
    """
    settings = settings or get_settings()
    uri = check_store_uri(uri or str(settings.store_uri))
    if uri.startswith("s3://"):
        return S3Store(uri, settings)
    return LocalStore(uri, max_workers=settings.s3_transfer_threads)
