"""Promote LoRA adapters behind an alias, and run a challenger adapter as a canary, as rollout does for versions.

Clients send ``model: NAME:ALIAS`` (``chat:support``); which stored adapter of the champion version
answers it is pinned in the apps' ingress ``user_config`` (:class:`~ray_app.serving.config.AdapterRouting`)
and recorded on the version (tag ``llmops.adapter_alias.ALIAS``, which a fresh deploy starts from).
Serve applies a user_config change in place (the ingress's ``reconfigure``), so promoting an adapter,
or starting or ending its canary, restarts no replica: the model replicas hold adapters (LRU) and
load a new one at its first request.

- :func:`promote_adapter`: roll the apps onto the adapter (a canary of the alias removed), then move
  the tag; a failed deploy is rolled back and the tag stays.
- :func:`start_adapter_canary` / :func:`stop_adapter_canary`: another adapter answers ``share`` of
  the alias's conversations (sticky by the versions' rule, :mod:`ray_app.serving.routing`), or no
  longer does. Answers are labelled NAME/VERSION:ADAPTER (headers, metrics, chat feedback), so
  :func:`ray_app.promotion.judge_adapter_canary` compares the two adapters as it compares versions.

Every decision is a tag on the version: ``adapter_promotion.ALIAS`` and ``adapter_canary.ALIAS``
(state, adapters, why, who, when).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from ray_app.adapters import ALIAS_TAG, alias_tag, check_adapter_name, list_adapters, tagged
from ray_app.serving.rollout import (
    CHAMPION,
    ServeError,
    decided_by,
    deploy,
    ingress_user_config,
    roll_apps,
    running_config,
    utc_now,
)
from ray_app.settings import Settings

PROMOTION_TAG, CANARY_TAG = "adapter_promotion.", "adapter_canary."

log = logging.getLogger(__name__)


@dataclass
class AdapterRollout:
    """What a promotion or canary did: NAME:ALIAS now (also) answered by ``adapter``; ``previous`` before."""

    name: str
    alias: str
    adapter: str
    version: str  # the champion version the adapter belongs to
    previous: str | None
    apps: list[str] = field(default_factory=list)


def promote_adapter(
    name: str, alias: str, adapter: str, settings: Settings, wait_s: float = 600.0, actor: str | None = None
) -> AdapterRollout:
    """Make ``NAME:ALIAS`` answered by the stored ``adapter`` of the champion version, atomically.

    The apps serving ``models:/NAME@champion`` with adapters are redeployed with the alias pinned
    (a canary of the alias ends: promoted if it ran ``adapter``, else rolled back) and must reach
    RUNNING; only then does the version's alias tag move. Raises ValueError when the adapter is not
    stored for the champion, ServeError when Serve cannot be rolled (it is rolled back).
    """
    before = running_config(settings)
    rollout = _rollout(name, alias, adapter, settings, before)

    def pinned(routing: dict[str, Any], args: dict[str, Any]) -> dict[str, Any] | None:
        canaries = {key: value for key, value in (routing.get("adapter_canaries") or {}).items() if key != alias}
        return _routed(routing, args, {alias: adapter}, canaries)

    try:
        was = f"{name}:{alias} on {rollout.previous}"
        rollout.apps = roll_apps(name, pinned, settings, wait_s, was, part="ingress")
        try:
            _tag(name, rollout.version, {alias_tag(alias): adapter}, settings)
        except Exception:
            if rollout.apps:
                deploy(before, settings, wait_s)  # exactly what ran before
            raise
    except Exception as exc:
        _record(rollout, PROMOTION_TAG, "failed", str(exc), settings, actor)
        raise
    _record(rollout, PROMOTION_TAG, "promoted", f"{rollout.previous or '(none)'} -> {adapter}", settings, actor)
    for canary in adapter_canaries(before, name).get(alias, ()):
        state = "promoted" if canary == adapter else "rolled_back"
        ended = AdapterRollout(name, alias, canary, rollout.version, rollout.previous)
        _record(ended, CANARY_TAG, state, f"{name}:{alias} promoted to {adapter}", settings, actor)
    return rollout


def start_adapter_canary(
    name: str,
    alias: str,
    adapter: str,
    settings: Settings,
    share: float | None = None,
    sticky_by: str | None = None,
    wait_s: float = 600.0,
    actor: str | None = None,
) -> AdapterRollout:
    """Answer ``share`` (settings.canary_share) of the conversations sent to ``NAME:ALIAS`` with ``adapter``,
    beside the adapter the alias names (which does not move). Raises ValueError when the alias names no
    adapter yet or names this one, ServeError when no app serves the champion with adapters."""
    rollout = _rollout(name, alias, adapter, settings, running_config(settings))
    if rollout.previous is None:
        raise ValueError(f"{name}:{alias} names no adapter yet: promote one first (no --canary)")
    if rollout.previous == adapter:
        raise ValueError(f"{name}:{alias} already is answered by {adapter!r}")
    spec = {"adapter": adapter, "share": share or settings.canary_share,
            "sticky_by": sticky_by or settings.canary_sticky_by}  # fmt: skip

    def with_canary(routing: dict[str, Any], args: dict[str, Any]) -> dict[str, Any] | None:
        canaries = {**(routing.get("adapter_canaries") or {}), alias: spec}
        return _routed(routing, args, {alias: rollout.previous}, canaries)

    try:
        was = f"{name}:{alias} on {rollout.previous} alone"
        rollout.apps = roll_apps(name, with_canary, settings, wait_s, was, part="ingress")
        if not rollout.apps:
            raise ServeError(f"no running Serve app serves models:/{name}@{CHAMPION} with adapters: nothing to run "
                             "a canary in")  # fmt: skip
    except Exception as exc:
        _record(rollout, CANARY_TAG, "failed", str(exc), settings, actor)
        raise
    reason = f"{spec['share']:.0%} of conversations (sticky by {spec['sticky_by']}) beside {rollout.previous}"
    _record(rollout, CANARY_TAG, "running", f"{reason}; apps: {', '.join(rollout.apps)}", settings, actor)
    return rollout


def stop_adapter_canary(
    name: str, alias: str, settings: Settings, reason: str, wait_s: float = 600.0, actor: str | None = None
) -> list[str]:
    """End the canary of ``NAME:ALIAS``: the alias's adapter answers all its conversations again.

    Returns the apps rolled ([] when none ran one); tags the decision ``rolled_back`` with ``reason``.
    No draining is needed: the canary is an adapter in the same replicas, which finish what they run.
    """
    before = running_config(settings)

    def alone(routing: dict[str, Any], _args: dict[str, Any]) -> dict[str, Any] | None:
        canaries = routing.get("adapter_canaries") or {}
        if alias not in canaries:
            return None
        return {**routing, "adapter_canaries": {key: value for key, value in canaries.items() if key != alias}}

    apps = roll_apps(name, alone, settings, wait_s, f"{name}:{alias} with its canary", part="ingress")
    version = _champion(name, settings)
    for canary in adapter_canaries(before, name).get(alias, ()):
        stopped = AdapterRollout(name, alias, canary, version, None, apps)
        _record(stopped, CANARY_TAG, "rolled_back", reason, settings, actor)
    return apps


def plan_adapter(name: str, alias: str, adapter: str, settings: Settings) -> AdapterRollout:
    """What promoting ``adapter`` as ``NAME:ALIAS`` would move (the champion version, what the alias names now);
    raises ValueError when a name is invalid or the adapter is not stored for the champion."""
    return _rollout(name, alias, adapter, settings, running_config(settings))


def reject_adapter(rollout: AdapterRollout, reason: str, settings: Settings, actor: str | None = None) -> None:
    """Record that ``rollout.adapter`` was not promoted as ``NAME:ALIAS`` (a gate kept the alias's adapter)."""
    _record(rollout, PROMOTION_TAG, "rejected", reason, settings, actor)


def _serves_champion(app: dict[str, Any], name: str) -> bool:
    """Whether an app of a Serve config serves ``models:/NAME@champion`` (where its adapters' aliases live)."""
    return (app.get("args") or {}).get("model") == f"models:/{name}@{CHAMPION}"


def adapter_apps(config: dict[str, Any], name: str) -> list[str]:
    """The apps of a Serve config (``running_config``) serving ``models:/NAME@champion`` with adapters."""
    return [app["name"] for app in config["applications"]
            if _serves_champion(app, name) and app["args"].get("max_adapters_per_replica")]  # fmt: skip


def adapter_canaries(config: dict[str, Any], name: str) -> dict[str, set[str]]:
    """``{alias: challenger adapters}`` the apps of a Serve config (``running_config``) run for ``name``."""
    found: dict[str, set[str]] = {}
    for app in config["applications"]:
        if _serves_champion(app, name):
            for alias, canary in (ingress_user_config(app).get("adapter_canaries") or {}).items():
                found.setdefault(alias, set()).add(canary["adapter"])
    return found


def current_adapter(
    name: str, alias: str, settings: Settings, version: str | None = None, config: dict[str, Any] | None = None
) -> str | None:
    """The adapter ``NAME:ALIAS`` names now: as pinned in a running app serving the champion (``config``: the
    running Serve config when the caller has it), else the version's tag; None when neither says."""
    from ray_app.registry import get_version

    for app in (config or running_config(settings))["applications"]:
        pinned = ingress_user_config(app).get("adapter_aliases") or {}
        if _serves_champion(app, name) and alias in pinned:
            return pinned[alias]
    version = version or _champion(name, settings)
    return tagged(get_version(f"models:/{name}/{version}", settings).tags, ALIAS_TAG).get(alias)


def _rollout(name: str, alias: str, adapter: str, settings: Settings, config: dict[str, Any]) -> AdapterRollout:
    """Check the names and that ``adapter`` is stored for the champion; what the alias names now (in the
    running Serve ``config``, else the version's tag)."""
    check_adapter_name(alias)
    check_adapter_name(adapter)
    version = _champion(name, settings)
    stored = list_adapters(name, version, settings)
    if adapter not in stored:
        raise ValueError(f"no adapter {adapter!r} is stored for {name}/{version} (the champion); stored: "
                         f"{', '.join(stored) or 'none'}")  # fmt: skip
    return AdapterRollout(name, alias, adapter, version, current_adapter(name, alias, settings, version, config))


def _champion(name: str, settings: Settings) -> str:
    from ray_app.registry import get_version

    return get_version(f"models:/{name}@{CHAMPION}", settings).version


def _routed(
    routing: dict[str, Any], args: dict[str, Any], aliases: dict[str, str], canaries: dict
) -> dict[str, Any] | None:
    """The ingress's user_config ``routing`` with ``aliases`` pinned and ``canaries`` as its adapter canaries;
    None for an app without adapters, or when nothing changes."""
    if not args.get("max_adapters_per_replica"):
        return None
    pinned = {**(routing.get("adapter_aliases") or {}), **aliases}
    if pinned == routing.get("adapter_aliases") and canaries == (routing.get("adapter_canaries") or {}):
        return None
    return {**routing, "adapter_aliases": pinned, "adapter_canaries": canaries}


def _tag(name: str, version: str, tags: dict[str, str], settings: Settings) -> None:
    from ray_app.registry import tag_version

    tag_version(name, version, tags, settings)


def _record(
    rollout: AdapterRollout, prefix: str, state: str, reason: str, settings: Settings, actor: str | None
) -> None:
    """Tag the version with a decision about ``NAME:ALIAS`` (``PREFIX.ALIAS``: the state; ``.adapter``,
    ``.reason``, ``.by``, ``.STATE_at``); a registry that is down too does not hide what happened to Serve
    (logged), except for a promotion, whose tag is the record."""
    key = f"{prefix}{rollout.alias}"
    by = decided_by(actor, "ray_app.serving.adapter_rollout")
    tags = {key: state, f"{key}.adapter": rollout.adapter, f"{key}.reason": reason[:4000], f"{key}.by": by,
            f"{key}.{state}_at": utc_now()}  # fmt: skip
    try:
        _tag(rollout.name, rollout.version, tags, settings)
    except Exception:
        if state == "promoted":
            raise
        log.exception("could not record %s=%s of %s (%s)", key, state, rollout.adapter, reason)
