"""The checkpoint/model store against a real S3 server process and a local folder."""

from __future__ import annotations

import filecmp
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import S3Server, s3_settings

from ray_app.settings import load_settings
from ray_app.storage import IntegrityError, LocalStore, S3Store, StoreError, open_store

BIG = 12 * 1024 * 1024 + 123  # over 10 MiB and over the 8 MiB part size: goes up in parts


def make_tree(root: Path) -> Path:
    """A directory of several files in nested folders, one of them over 10 MiB."""
    (root / "tokenizer").mkdir(parents=True)
    (root / "config.json").write_text('{"model_type": "llama"}')
    (root / "tokenizer" / "tokenizer.json").write_text('{"vocab": {}}' * 100)
    (root / "empty.txt").write_bytes(b"")
    (root / "model.safetensors").write_bytes(os.urandom(BIG))
    return root


def assert_same_tree(left: Path, right: Path) -> None:
    left_files = sorted(p.relative_to(left).as_posix() for p in left.rglob("*") if p.is_file())
    right_files = sorted(
        p.relative_to(right).as_posix() for p in right.rglob("*") if p.is_file() and p.name != "_manifest.json"
    )
    assert left_files == right_files
    for rel in left_files:
        assert filecmp.cmp(left / rel, right / rel, shallow=False), rel


@pytest.fixture()
def s3_store(s3_server: S3Server, tmp_path) -> S3Store:
    store = open_store(settings=s3_settings(s3_server, tmp_path / "home", bucket=f"store-{os.getpid()}"))
    assert isinstance(store, S3Store)
    store.ensure()
    return store


def test_directory_round_trips_through_s3_byte_identical(s3_store: S3Store, tmp_path):
    source = make_tree(tmp_path / "src")
    manifest = s3_store.upload_dir(source, "models/tiny/v1", progress=False)

    assert set(manifest) == {"config.json", "tokenizer/tokenizer.json", "empty.txt", "model.safetensors"}
    listed = {info.key: info.size for info in s3_store.list("models/tiny/v1")}
    assert listed["models/tiny/v1/model.safetensors"] == BIG
    assert "models/tiny/v1/_manifest.json" in listed

    out = s3_store.download_dir("models/tiny/v1", tmp_path / "dst", progress=False)
    assert_same_tree(source, out)


def test_large_files_are_uploaded_in_multiple_parts(s3_store: S3Store, tmp_path):
    source = make_tree(tmp_path / "src")
    s3_store.upload_dir(source, "multipart", progress=False)
    stat = s3_store.client.stat_object(s3_store.bucket, "store/multipart/model.safetensors")
    # S3 gives multipart objects an ETag of "<md5-of-md5s>-<parts>".
    assert stat.etag.endswith("-2"), stat.etag
    small = s3_store.client.stat_object(s3_store.bucket, "store/multipart/config.json")
    assert "-" not in small.etag


def test_directory_round_trips_through_a_local_store(tmp_path):
    store = open_store(str(tmp_path / "store"), load_settings(home=tmp_path))
    assert isinstance(store, LocalStore)
    store.ensure()
    source = make_tree(tmp_path / "src")
    store.upload_dir(source, "ckpt/step-10", progress=False)
    out = store.download_dir("ckpt/step-10", tmp_path / "dst", progress=False)
    assert_same_tree(source, out)
    assert [info.key for info in store.list("ckpt")][:1] == ["ckpt/step-10/_manifest.json"]


def test_corrupted_object_fails_the_download_and_leaves_no_partial_folder(tmp_path):
    store = LocalStore(tmp_path / "store")
    store.upload_dir(make_tree(tmp_path / "src"), "m", progress=False)
    (tmp_path / "store" / "m" / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(IntegrityError, match=r"config\.json"):
        store.download_dir("m", tmp_path / "dst", progress=False)
    assert not (tmp_path / "dst").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".dst")] == []


def test_download_of_an_incomplete_upload_is_refused(s3_store: S3Store, tmp_path):
    source = make_tree(tmp_path / "src")
    s3_store.upload_dir(source, "partial", progress=False)
    s3_store.client.remove_object(s3_store.bucket, "store/partial/_manifest.json")
    with pytest.raises(StoreError, match="no complete upload"):
        s3_store.download_dir("partial", tmp_path / "dst", progress=False)


def test_delete_prefix_removes_only_that_prefix(s3_store: S3Store, tmp_path):
    source = make_tree(tmp_path / "src")
    (source / "model.safetensors").write_bytes(b"small")
    s3_store.upload_dir(source, "runs/a", progress=False)
    s3_store.upload_dir(source, "runs/b", progress=False)
    assert s3_store.delete_prefix("runs/a") == 5
    assert s3_store.list("runs/a") == []
    assert len(s3_store.list("runs/b")) == 5
    with pytest.raises(StoreError, match="name a prefix"):
        LocalStore(tmp_path / "local").delete_prefix("")


def test_ray_storage_gives_a_pyarrow_filesystem_on_the_endpoint(s3_store: S3Store):
    path, filesystem = s3_store.ray_storage()
    assert path == f"{s3_store.bucket}/store"
    with filesystem.open_output_stream(f"{path}/ray/probe.txt") as out:
        out.write(b"written through pyarrow")
    assert s3_store.exists("ray/probe.txt")
    assert s3_store._read_bytes("ray/probe.txt") == b"written through pyarrow"


def test_unreachable_endpoint_error_names_the_url(tmp_path):
    settings = load_settings(
        home=tmp_path,
        store_uri="s3://bucket-x/p",
        s3_endpoint_url="http://127.0.0.1:9",
        aws_access_key_id="a",
        aws_secret_access_key="b",
    )
    store = open_store(settings=settings)
    with pytest.raises(StoreError, match=r"http://127\.0\.0\.1:9"):
        store.ensure()


def test_local_keys_cannot_escape_the_store_root(tmp_path):
    with pytest.raises(StoreError, match="escapes"):
        LocalStore(tmp_path / "store").list("../../etc")


@pytest.mark.parametrize("unsafe", ["../x", "/etc/passwd", "a/../../x", "a//b", "C:x"])
def test_a_crafted_manifest_path_is_refused_on_download(s3_store: S3Store, tmp_path, unsafe):
    sha = "0" * 64
    for store in (s3_store, LocalStore(tmp_path / "local")):
        store._write_bytes("evil/_manifest.json", json.dumps({unsafe: {"size": 1, "sha256": sha}}).encode())
        with pytest.raises(IntegrityError, match="unsafe path"):
            store.download_dir("evil", tmp_path / "out" / "dst", progress=False)
    assert not (tmp_path / "x").exists() and not (tmp_path / "out").exists()


def test_a_manifest_that_is_not_a_manifest_is_an_integrity_error(tmp_path):
    store = LocalStore(tmp_path / "store")
    store._write_bytes("m/_manifest.json", b"{not json")
    with pytest.raises(IntegrityError, match="not valid JSON"):
        store.download_dir("m", tmp_path / "dst", progress=False)
    store._write_bytes("m/_manifest.json", b'{"config.json": {"size": "1"}}')
    with pytest.raises(IntegrityError, match=r"config\.json"):
        store.read_manifest("m")


def test_an_overwrite_killed_midway_reads_as_incomplete_and_the_next_upload_completes(tmp_path):
    """A real process uploading over a folder is SIGKILLed once new files land: readers see
    'incomplete', never old and new mixed; the next upload cleans its leftovers and completes."""
    store = LocalStore(tmp_path / "store")
    store.upload_dir(make_tree(tmp_path / "old"), "m", progress=False)
    new = tmp_path / "new"
    new.mkdir()
    for i in range(300):
        (new / f"shard-{i:03d}.bin").write_bytes(os.urandom(256 * 1024))
    code = (
        f"from ray_app.storage import LocalStore; "
        f"LocalStore({str(store.root)!r}, max_workers=1).upload_dir({str(new)!r}, 'm', progress=False)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.monotonic() + 60
    while not (store.root / "m" / "shard-010.bin").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the upload ended before it could be killed"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    assert store.read_manifest("m") is None
    with pytest.raises(StoreError, match="no complete upload"):
        store.download_dir("m", tmp_path / "dst", progress=False)
    assert not any(info.key.endswith(".partial") for info in store.list("m"))

    store.upload_dir(new, "m", progress=False)
    assert not list((store.root / "m").rglob("*.partial"))
    out = store.download_dir("m", tmp_path / "dst", progress=False)
    assert_same_tree(new, out)  # the old folder's files are gone too
    assert sorted(p.name for p in (store.root / "m").iterdir()) == sorted([*os.listdir(new), "_manifest.json"])


def test_an_overwrite_on_s3_leaves_only_the_new_folder(s3_store: S3Store, tmp_path):
    s3_store.upload_dir(make_tree(tmp_path / "old"), "over", progress=False)
    new = tmp_path / "new"
    new.mkdir()
    (new / "config.json").write_text('{"model_type": "qwen2"}')
    s3_store.upload_dir(new, "over", progress=False)
    assert [info.key for info in s3_store.list("over")] == ["over/_manifest.json", "over/config.json"]
    assert_same_tree(new, s3_store.download_dir("over", tmp_path / "dst", progress=False))
