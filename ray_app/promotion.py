"""Promotion policy: when a candidate version may replace the champion. The one home of the rule.

**The offline gate**: the candidate and the reference (the current ``champion``, or the base
model when there is none) are evaluated on the *same* held-out data with the same sequence
length; the candidate wins only if its loss is below the reference's by the margin
``promotion_min_improvement`` (a fraction, from settings; a run may pass its own). A tie loses,
and so does a candidate or reference without a usable loss: nothing is promoted on missing
evidence. The demo, ``llmops promote --gate`` and the DAG's evaluate/promote steps all decide
here; the move itself is ``ray_app.serving.rollout.promote`` (atomic, Serve first).

Every evaluation is tagged on the candidate (``gate.candidate_loss``, ``gate.champion_loss``,
``gate.champion``) and every decision too (``promotion`` and ``promotion.*``, by
``rollout.record_promotion``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ray_app.settings import Settings

GATE_CANDIDATE_LOSS = "gate.candidate_loss"
GATE_CHAMPION_LOSS = "gate.champion_loss"
GATE_CHAMPION = "gate.champion"


class PromotionError(RuntimeError):
    """A gate cannot be applied (nothing evaluated, the champion moved since); the message says why."""


@dataclass(frozen=True)
class GateDecision:
    """The offline gate's verdict on a candidate, with the evidence it used."""

    promoted: bool
    reason: str
    candidate_loss: float | None
    reference_loss: float | None
    margin: float


def offline_gate(
    candidate_loss: float | None, reference_loss: float | None, margin: float, reference: str = "the champion"
) -> GateDecision:
    """Whether a candidate with ``candidate_loss`` replaces ``reference`` (held-out losses on the same data).

    Promoted only if ``candidate_loss < reference_loss * (1 - margin)``: ties and missing or
    non-finite losses are rejected. ``margin`` is a fraction in [0, 1).
    """
    if not (isinstance(margin, int | float) and 0 <= margin < 1):
        raise ValueError(f"promotion_min_improvement: {margin!r} is not a fraction in [0, 1)")

    def verdict(promoted: bool, why: str) -> GateDecision:
        reason = f"{why} (vs {reference}, margin {margin:g})"
        return GateDecision(promoted, reason, candidate_loss, reference_loss, margin)

    if candidate_loss is None or not math.isfinite(candidate_loss):
        return verdict(False, f"the candidate has no usable held-out loss ({candidate_loss})")
    if reference_loss is None or not math.isfinite(reference_loss):
        return verdict(False, f"{reference} has no usable held-out loss ({reference_loss}) to compare with")
    needed = reference_loss * (1 - margin)
    if candidate_loss < needed:
        return verdict(True, f"eval loss {candidate_loss:.4f} < {needed:.4f}")
    return verdict(False, f"eval loss {candidate_loss:.4f} is not below {needed:.4f}")


@dataclass
class GateEvaluation:
    """Held-out losses of a candidate and its reference on the same data (what ``evaluate`` tags)."""

    name: str
    candidate_version: str
    candidate_loss: float
    reference: str  # models:/NAME/V of the champion, or the base model's reference
    champion_version: str | None
    reference_loss: float
    eval_data: list[str]
    samples: list[dict[str, Any]] = field(default_factory=list)


def champion_of(name: str, settings: Settings):
    """The version ``champion`` points to, or None when there is none (yet)."""
    from ray_app.registry import RegistryError, get_version

    try:
        return get_version(f"models:/{name}@champion", settings)
    except RegistryError:
        return None


def reference_for(name: str, champion, base_model: str | None) -> str:
    """What a candidate is compared with: the champion's version, else the base model it was trained from."""
    return f"models:/{name}/{champion.version}" if champion else (base_model or "default")


def evaluate(cfg, settings: Settings, version: str, known_losses: dict[str, float] | None = None) -> GateEvaluation:
    """Evaluate candidate ``version`` of ``cfg.registered_model`` and its reference on ``cfg.eval_data``.

    ``known_losses`` maps model references already evaluated on exactly ``cfg.eval_data`` at
    ``cfg.seq_len`` (the demo's base model, a run's own eval loss) to their loss: those are not
    evaluated again. The losses are tagged on the candidate version (``gate.*``).
    """
    from ray_app.registry import client, get_version
    from training.evaluate import evaluate_model

    name = _registered_name(cfg)
    if not cfg.eval_data:
        raise PromotionError("the config has no eval_data: the gate needs a held-out set")
    candidate = get_version(f"models:/{name}/{version}", settings)
    champion = champion_of(name, settings)
    candidate_ref = f"models:/{name}/{candidate.version}"
    reference = reference_for(name, champion, cfg.model)
    known = known_losses or {}
    kwargs = {"seq_len": cfg.seq_len, "settings": settings, "prompts": cfg.sample_prompts,
              "max_new_tokens": cfg.max_new_tokens}  # fmt: skip
    samples: list[dict[str, Any]] = []
    if candidate_ref in known:
        candidate_loss = known[candidate_ref]
    else:
        report = evaluate_model(candidate_ref, cfg.eval_data, **kwargs)
        candidate_loss, samples = report.loss, report.samples
    reference_loss = known[reference] if reference in known else evaluate_model(reference, cfg.eval_data, **kwargs).loss
    mlflow = client(settings)
    for key, value in ((GATE_CANDIDATE_LOSS, f"{candidate_loss:.6f}"), (GATE_CHAMPION_LOSS, f"{reference_loss:.6f}"),
                       (GATE_CHAMPION, reference)):  # fmt: skip
        mlflow.set_model_version_tag(name, candidate.version, key, value)
    if candidate.run_id:
        mlflow.log_metric(candidate.run_id, "gate_candidate_loss", candidate_loss)
        mlflow.log_metric(candidate.run_id, "gate_champion_loss", reference_loss)
    champion_version = champion.version if champion else None
    return GateEvaluation(name, candidate.version, candidate_loss, reference, champion_version, reference_loss,
                          list(cfg.eval_data), samples)  # fmt: skip


def decide(
    cfg, settings: Settings, version: str, margin: float | None, actor: str, rollout: bool = True
) -> dict[str, Any]:
    """Apply the offline gate to evaluated ``version``; promote it atomically if it wins, else record the rejection.

    Refuses (PromotionError) a version not evaluated, or evaluated against a champion that has
    moved since. ``margin`` None is ``settings.promotion_min_improvement``; ``rollout`` False moves
    the alias without rolling Serve (``llmops promote --no-rollout``).
    """
    from ray_app.registry import get_version
    from ray_app.serving.rollout import promote, record_promotion

    margin = settings.promotion_min_improvement if margin is None else margin
    name = _registered_name(cfg)
    candidate = get_version(f"models:/{name}/{version}", settings)
    champion = champion_of(name, settings)
    previous = champion.version if champion else None
    if previous == candidate.version:
        return {"name": name, "version": version, "promoted": True, "previous": version,
                "reason": f"version {version} already is the champion"}  # fmt: skip
    tags = candidate.tags
    if GATE_CANDIDATE_LOSS not in tags:
        raise PromotionError(f"{name} version {version} has not been evaluated (no gate.* tags): run evaluate first")
    current = reference_for(name, champion, cfg.model)
    if tags.get(GATE_CHAMPION, "") != current:
        raise PromotionError(f"the champion changed since the evaluation ({tags.get(GATE_CHAMPION, '')} -> "
                             f"{current}); re-run evaluate")  # fmt: skip
    gate = offline_gate(_float(tags.get(GATE_CANDIDATE_LOSS)), _float(tags.get(GATE_CHAMPION_LOSS)), margin, current)
    if not gate.promoted:
        record_promotion(name, version, previous, "rejected", gate.reason, settings, actor=actor)
        return {"name": name, "version": version, "promoted": False, "reason": gate.reason, "previous": previous}
    # Atomic: Serve's champion apps run the new version before the alias moves (or nothing changes).
    promotion = promote(name, settings, version=version, rollout=rollout, actor=actor)
    return {"name": name, "version": version, "promoted": True, "reason": gate.reason, "previous": previous,
            "rolled_apps": promotion.rolled_apps}  # fmt: skip


def _registered_name(cfg) -> str:
    if not cfg.registered_model:
        raise PromotionError("the config has no registered_model: nothing to evaluate or promote")
    return cfg.registered_model


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except ValueError:
        return None
