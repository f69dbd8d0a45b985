"""The cases the promotion gate replays: failures users reported and answers they liked.

- **Replay set**: the approved (or trusted) corrections that became usable in the last
  ``gate_replay_days``: each a pair, the correction over the answer it corrects. A candidate's
  *replay accuracy* is how often it finds the correction more likely.
- **Regression set**: every approved correction's text and every thumbs-up answer that may
  train, kept as permanent cases in the store, ``regression/<NAME>/v<NNNN>/cases.jsonl``
  (uploaded with a manifest and checksums). It only grows: each version is the previous one
  plus what is new, so a chat database that forgets a conversation does not lose its case, and
  the version a gate used can be read again. A candidate may not make a case less likely per
  token than its reference does by more than a margin.

Which feedback counts is the review policy's (``ray_app.chat.review``); the rules that judge
the scores are ``ray_app.promotion``'s.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ray_app.chat.feedback import FeedbackRecord
from ray_app.chat.preferences import correction_pair, trainable
from ray_app.chat.review import CORRECTION, THUMBS_UP, ReviewPolicy, correction, digest, kind, ready_at
from ray_app.settings import Settings

CASES_FILE = "cases.jsonl"
VERSION_FOLDER = re.compile(r"v(\d{4,})")


@dataclass(frozen=True)
class RegressionSet:
    """One stored version of a model's regression cases; ``added`` of them are new in it."""

    uri: str
    version: int
    cases: list[dict]
    added: int


def replay_cases(records: list[FeedbackRecord], policy: ReviewPolicy, since: str) -> list[dict]:
    """The replay set: the pairs of the corrections the ``policy`` lets train that became usable after ``since``."""
    cases = []
    for record in trainable(records, policy):
        pair = correction_pair(record)
        if pair is not None and ready_at(record) > since:
            cases.append({**pair, "id": record.feedback_id, "model_version": record.model_version})
    return cases


def regression_cases(records: list[FeedbackRecord], policy: ReviewPolicy) -> list[dict]:
    """Cases for the regression set: each usable correction's text and each usable thumbs-up answer.

    A case's id covers what was approved: a correction edited and approved again is a new case
    (the old one stays: it was right when it was approved).
    """
    cases = []
    for record in trainable(records, policy):
        what = kind(record)
        if what not in (CORRECTION, THUMBS_UP):
            continue
        completion = correction(record) if what == CORRECTION else record.answer
        cases.append({"id": f"{record.feedback_id}:{digest(record)[:12]}", "kind": what,
                      "messages": record.conversation, "completion": completion,
                      "model_version": record.model_version, "added_at": ready_at(record)})  # fmt: skip
    return cases


def grow_regression_set(name: str, cases: list[dict], settings: Settings) -> RegressionSet:
    """Add the ``cases`` not yet kept to ``name``'s regression set: a new version when any is new.

    Returns the version that holds them all (the latest one when nothing was new).
    """
    from ray_app.storage import open_store

    store = open_store(settings=settings)
    store.ensure()
    version, kept = latest_regression_set(name, settings)
    known = {case["id"] for case in kept}
    new = [case for case in cases if case["id"] not in known]
    if not new:
        return RegressionSet(store.uri(_folder(name, version)) if version else "", version, kept, 0)
    version += 1
    with tempfile.TemporaryDirectory() as folder:
        lines = [json.dumps(case, sort_keys=True) for case in [*kept, *new]]
        (Path(folder) / CASES_FILE).write_text("\n".join(lines) + "\n")
        store.upload_dir(folder, _folder(name, version), progress=False)
    return RegressionSet(store.uri(_folder(name, version)), version, [*kept, *new], len(new))


def latest_regression_set(name: str, settings: Settings) -> tuple[int, list[dict]]:
    """(version, cases) of ``name``'s newest complete regression set; (0, []) when there is none."""
    from ray_app.storage import open_store

    store = open_store(settings=settings)
    prefix = f"regression/{_safe(name)}/"
    versions = sorted({int(match.group(1)) for info in store.list(prefix)
                       if (match := VERSION_FOLDER.fullmatch(info.key[len(prefix):].split("/", 1)[0]))})  # fmt: skip
    for version in reversed(versions):  # an interrupted upload (no manifest) is skipped
        if store.read_manifest(_folder(name, version)) is None:
            continue
        with tempfile.TemporaryDirectory() as folder:
            local = store.download_dir(_folder(name, version), Path(folder) / "set", progress=False)
            text = (local / CASES_FILE).read_text()
        return version, [json.loads(line) for line in text.splitlines() if line.strip()]
    return 0, []


def replay_since(days: float) -> str:
    """The ISO time ``days`` ago (the replay window's start), in the chat's timestamp format."""
    start = dt.datetime.now(dt.UTC) - dt.timedelta(days=days)
    return start.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _folder(name: str, version: int) -> str:
    return f"regression/{_safe(name)}/v{version:04d}"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name)
