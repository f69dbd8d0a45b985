"""Chat data for SFT with Ray Data: read jsonl/parquet (local or s3://), apply the chat template,
mask every non-assistant token from the loss, pack or pad to the sequence length.

A record is ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``
with at least one assistant turn. Bad records are counted, logged with their text and
skipped; a dataset with no usable record fails with a clear message.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

from ray_app.settings import Settings
from ray_app.storage import pyarrow_location

IGNORE_INDEX = -100
ROLES = {"system", "user", "assistant"}
log = logging.getLogger(__name__)


class DatasetError(ValueError):
    """A dataset cannot be used for training; the message names the URIs."""


@dataclass
class DataStats:
    """What preparation saw: usable and skipped records, truncations, packed rows and tokens."""

    records: int = 0
    skipped: int = 0
    truncated: int = 0
    rows: int = 0
    trained_tokens: int = 0
    skipped_examples: list[str] = field(default_factory=list)


@lru_cache(maxsize=4)
def _tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise DatasetError(f"the tokenizer in {model_dir} has no chat template")
    return tokenizer


def parse_record(text: str) -> list[dict[str, str]]:
    """The messages of one jsonl line; raises ValueError saying what is wrong with it."""
    record = json.loads(text)
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list) or not record["messages"]:
        raise ValueError("expected an object with a non-empty 'messages' list")
    messages = record["messages"]
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise ValueError(f"message role must be one of {sorted(ROLES)}: {message!r:.80}")
        if not isinstance(message.get("content"), str):
            raise ValueError("message content must be a string")
    if not any(message["role"] == "assistant" for message in messages):
        raise ValueError("no assistant message to learn from")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def tokenize_chat(messages: list[dict[str, str]], tokenizer, seq_len: int) -> tuple[list[int], list[int], bool]:
    """Token ids of the templated conversation and labels with non-assistant tokens at -100.

    Each assistant turn's tokens are found as the difference between the template applied
    up to and including that turn and up to the turn before with the generation prompt.
    Returns ``(input_ids, labels, truncated)``.
    """

    def ids(conversation: list[dict[str, str]], generation_prompt: bool) -> list[int]:
        out = tokenizer.apply_chat_template(conversation, tokenize=True, add_generation_prompt=generation_prompt)
        if isinstance(out, dict) or hasattr(out, "input_ids"):
            out = out["input_ids"]
        return list(out)

    full = ids(messages, False)
    labels = [IGNORE_INDEX] * len(full)
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(ids(messages[:index], True))
        end = len(ids(messages[: index + 1], False))
        labels[start:end] = full[start:end]
    truncated = len(full) > seq_len
    return full[:seq_len], labels[:seq_len], truncated


def tokenize_batch(batch: dict[str, np.ndarray], model_dir: str, seq_len: int) -> dict[str, np.ndarray]:
    """Ray Data map_batches function: jsonl lines -> token ids, labels, and an error per line."""
    tokenizer = _tokenizer(model_dir)
    out: dict[str, list[Any]] = {"input_ids": [], "labels": [], "error": [], "truncated": [], "source": []}
    for text, path in zip(batch["text"], batch.get("path", [""] * len(batch["text"])), strict=False):
        input_ids: list[int] = []
        labels: list[int] = []
        error, truncated = "", False
        if not str(text).strip():
            continue  # blank lines are not records
        try:
            input_ids, labels, truncated = tokenize_chat(parse_record(str(text)), tokenizer, seq_len)
            if all(label == IGNORE_INDEX for label in labels):
                error = f"no assistant tokens within the first {seq_len} tokens"
        except (ValueError, TypeError) as exc:  # json.JSONDecodeError is a ValueError
            error = str(exc)
        out["input_ids"].append(np.asarray(input_ids, dtype=np.int64))
        out["labels"].append(np.asarray(labels, dtype=np.int64))
        out["error"].append(error)
        out["truncated"].append(truncated)
        out["source"].append(f"{path}: {str(text)[:120]}")
    return {key: np.asarray(value, dtype=object) if key in ("input_ids", "labels") else np.asarray(value)
            for key, value in out.items()}  # fmt: skip


def pack_batch(batch: dict[str, np.ndarray], seq_len: int, pad_id: int, pack: bool) -> dict[str, np.ndarray]:
    """Fixed-length rows: examples concatenated into ``seq_len`` chunks (pack) or one per row, padded."""
    rows_ids, rows_labels = [], []
    if pack:
        ids = np.concatenate(list(batch["input_ids"])) if len(batch["input_ids"]) else np.zeros(0, np.int64)
        labels = np.concatenate(list(batch["labels"])) if len(batch["labels"]) else np.zeros(0, np.int64)
        for start in range(0, len(ids), seq_len):
            rows_ids.append(ids[start : start + seq_len])
            rows_labels.append(labels[start : start + seq_len])
    else:
        rows_ids, rows_labels = list(batch["input_ids"]), list(batch["labels"])
    input_ids = np.full((len(rows_ids), seq_len), pad_id, dtype=np.int64)
    label_arr = np.full((len(rows_ids), seq_len), IGNORE_INDEX, dtype=np.int64)
    mask = np.zeros((len(rows_ids), seq_len), dtype=np.int64)
    for row, (ids_row, labels_row) in enumerate(zip(rows_ids, rows_labels, strict=True)):
        input_ids[row, : len(ids_row)] = ids_row
        label_arr[row, : len(labels_row)] = labels_row
        mask[row, : len(ids_row)] = 1
    keep = (label_arr != IGNORE_INDEX).any(axis=1)
    return {"input_ids": input_ids[keep], "labels": label_arr[keep], "attention_mask": mask[keep]}


def read_lines(uris: list[str], settings: Settings):
    """A Ray dataset of ``{"text": line, "path": file}`` from jsonl files/folders or parquet files."""
    import ray.data

    parts = []
    for uri in uris:
        path, filesystem = pyarrow_location(uri, settings)
        if uri.endswith(".parquet"):
            table = ray.data.read_parquet(path, filesystem=filesystem, include_paths=True)
            parts.append(
                table.map(lambda row: {"text": json.dumps({"messages": _plain(row["messages"])}), "path": row["path"]})
            )
        else:
            parts.append(
                ray.data.read_text(path, filesystem=filesystem, include_paths=True, file_extensions=["jsonl", "json"])
            )
    dataset = parts[0]
    for extra in parts[1:]:
        dataset = dataset.union(extra)
    return dataset


def _plain(messages: Any) -> list[dict[str, Any]]:
    return [{"role": m["role"], "content": m["content"]} for m in list(messages)]


def prepare_dataset(uris: list[str], model_dir: str, seq_len: int, pack: bool, settings: Settings):
    """Tokenize, mask and pack a chat dataset with Ray Data; returns ``(dataset, stats)``, materialized.

    Raises DatasetError if no record is usable, naming the URIs and the first errors.
    """

    try:
        lines = read_lines(uris, settings)
        tokenized = lines.map_batches(
            tokenize_batch, fn_kwargs={"model_dir": model_dir, "seq_len": seq_len}, batch_size=256, num_cpus=0.5
        ).materialize()
    except (FileNotFoundError, OSError) as exc:
        raise DatasetError(f"cannot read dataset {', '.join(uris)}: {exc}") from exc
    # Counts come from one small row per block (a map, not Ray Data's sum/count aggregations,
    # which start shuffle actors: seconds each, whatever the size of the data).
    stats = DataStats()
    bad: list[tuple[str, str]] = []
    for block in tokenized.map_batches(_summarise, batch_size=None, num_cpus=0.5).take_all():
        stats.records += int(block["records"])
        stats.truncated += int(block["truncated"])
        stats.skipped += int(block["skipped"])
        bad.extend(tuple(pair) for pair in json.loads(block["bad"]))
    for error, source in bad:
        log.warning("skipping record (%s): %s", error, source)
    stats.skipped_examples = [f"{error} :: {source}" for error, source in bad[:5]]
    if stats.records == 0:
        hint = "; ".join(stats.skipped_examples[:3]) or "the files hold no records"
        raise DatasetError(f"no usable chat record in {', '.join(uris)} ({stats.skipped} skipped: {hint})")
    pad_id = _tokenizer(model_dir).pad_token_id
    packed = (
        tokenized.filter(expr="error == ''")
        .map_batches(
            pack_batch, fn_kwargs={"seq_len": seq_len, "pad_id": pad_id, "pack": pack}, batch_size=512, num_cpus=0.5
        )
        .materialize()
    )
    stats.rows = packed.count()
    label_counts = packed.map_batches(_label_tokens, batch_size=None, num_cpus=0.5).take_all()
    stats.trained_tokens = sum(int(row["n"]) for row in label_counts)
    return packed, stats


def _summarise(block: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One row for a block of tokenized records: usable, truncated, skipped, and the first bad ones."""
    errors = np.asarray(block.get("error", []), dtype=str)
    good = errors == ""
    bad = np.flatnonzero(~good)[:1000]
    sources = block.get("source", [])
    return {
        "records": np.asarray([int(good.sum())]),
        "truncated": np.asarray([int(np.asarray(block.get("truncated", []), dtype=bool)[good].sum())]),
        "skipped": np.asarray([int((~good).sum())]),
        "bad": np.asarray([json.dumps([[str(errors[i]), str(sources[i])] for i in bad])]),
    }


def _label_tokens(block: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One row for a block of packed rows: how many tokens carry a label."""
    return {"n": np.asarray([int((np.asarray(block["labels"]) != IGNORE_INDEX).sum())])}


def read_text_lines(uris: list[str], settings: Settings) -> list[tuple[str, int, str]]:
    """``(file, line number, line)`` of every non-blank line of small jsonl files or folders, read without Ray."""
    import pyarrow.fs

    lines = []
    for uri in uris:
        path, filesystem = pyarrow_location(uri, settings)
        filesystem = filesystem or pyarrow.fs.LocalFileSystem()
        info = filesystem.get_file_info(path)
        if info.type == pyarrow.fs.FileType.NotFound:
            raise DatasetError(f"eval dataset not found: {uri}")
        files = [path]
        if info.type == pyarrow.fs.FileType.Directory:
            selector = pyarrow.fs.FileSelector(path, recursive=True)
            files = sorted(i.path for i in filesystem.get_file_info(selector) if i.path.endswith((".jsonl", ".json")))
        for file in files:
            with filesystem.open_input_stream(file) as stream:
                text = stream.read().decode()
            lines += [(file, number, line) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]
    return lines


def read_records(uris: list[str], settings: Settings) -> list[list[dict[str, str]]]:
    """Every valid conversation of small jsonl files (eval sets), read without Ray; bad lines skipped."""
    conversations = []
    for file, number, line in read_text_lines(uris, settings):
        try:
            conversations.append(parse_record(line))
        except ValueError as exc:
            log.warning("skipping %s line %d: %s", file, number, exc)
    if not conversations:
        raise DatasetError(f"no usable chat record in {', '.join(uris)}")
    return conversations
