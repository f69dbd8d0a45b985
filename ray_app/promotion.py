"""Promotion policy: when a candidate version may replace the champion. The one home of the rule.

**The offline gate**: the candidate and the reference (the current ``champion``, or the base
model when there is none) are evaluated on the *same* held-out data with the same sequence
length; the candidate wins only if its loss is below the reference's by the margin
``promotion_min_improvement`` (a fraction, from settings; a run may pass its own). A tie loses,
and so does a candidate or reference without a usable loss: nothing is promoted on missing
evidence. The demo, ``llmops promote --gate`` and the DAG's evaluate/promote steps all decide
here; the move itself is ``ray_app.serving.rollout.promote`` (atomic, Serve first).

**The cases users gave** (``ray_app.regression``): on the replayed recent corrections, the
candidate's mean preference for the correction over the answer it corrects (log-probability
per token: a longer correction is not held back by its length) may trail the reference's by
at most ``gate_replay_margin`` nats per token, and it must prefer ``gate_min_replay_accuracy``
of them; and it may lose no more than ``gate_max_regressions`` of the regression set's cases
(every approved correction, every liked answer) by more than ``gate_regression_margin`` nats
per token against the reference. No case is no evidence against.

Every evaluation is tagged on the candidate (``gate.candidate_loss``, ``gate.champion_loss``,
``gate.champion``, ``gate.replay_*``, ``gate.regression_*``) and every decision too
(``promotion`` and ``promotion.*``, by ``rollout.record_promotion``).

**LoRA adapters behind an alias** (``NAME:ALIAS``) pass the same gate (:func:`gate_adapter`): the
champion with the new adapter against the champion with the alias's adapter, tagged on the
champion version (``adapter_gate.ALIAS.*``); their canary is judged by the same policy
(:func:`judge_adapter_canary`).
"""

from __future__ import annotations

import calendar
import dataclasses
import functools
import math
import time
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
    candidate_loss: float | None, reference_loss: float | None, margin: float, reference: str = "the champion",
    tolerance: float | None = None,
) -> GateDecision:  # fmt: skip
    """Whether a candidate with ``candidate_loss`` replaces ``reference`` (held-out losses on the same data).

    Promoted only if ``candidate_loss < reference_loss * (1 - margin)``: ties and missing or
    non-finite losses are rejected. ``margin`` is a fraction in [0, 1). With ``tolerance`` (a
    preference candidate, whose objective is not the held-out loss) the loss need only stay
    within ``reference_loss * (1 + tolerance)``; what it learned is judged on the cases instead.
    """
    if not (isinstance(margin, int | float) and 0 <= margin < 1):
        raise ValueError(f"promotion_min_improvement: {margin!r} is not a fraction in [0, 1)")

    def verdict(promoted: bool, why: str) -> GateDecision:
        rule = f"margin {margin:g}" if tolerance is None else f"preference candidate, tolerance {tolerance:g}"
        return GateDecision(promoted, f"{why} (vs {reference}, {rule})", candidate_loss, reference_loss, margin)

    if candidate_loss is None or not math.isfinite(candidate_loss):
        return verdict(False, f"the candidate has no usable held-out loss ({candidate_loss})")
    if reference_loss is None or not math.isfinite(reference_loss):
        return verdict(False, f"{reference} has no usable held-out loss ({reference_loss}) to compare with")
    if tolerance is not None:
        allowed = reference_loss * (1 + tolerance)
        if candidate_loss <= allowed:
            return verdict(True, f"eval loss {candidate_loss:.4f} <= {allowed:.4f}")
        return verdict(False, f"eval loss {candidate_loss:.4f} is above {allowed:.4f}")
    needed = reference_loss * (1 - margin)
    if candidate_loss < needed:
        return verdict(True, f"eval loss {candidate_loss:.4f} < {needed:.4f}")
    return verdict(False, f"eval loss {candidate_loss:.4f} is not below {needed:.4f}")


MAX_LOST_IDS = 20  # the lost regression cases named on a version (all are counted)


@dataclass(frozen=True)
class CaseScores:
    """The candidate and its reference on the replay and regression cases (what ``evaluate`` tags).

    A replayed pair's *margin* is the correction's log-probability per token minus the corrected
    answer's (per token: a longer correction is not held back by its length); a *win* is a
    positive margin.
    """

    replay_cases: int = 0
    candidate_wins: int = 0
    reference_wins: int = 0
    candidate_margin: float = 0.0  # mean margin over the replayed pairs
    reference_margin: float = 0.0
    regression_cases: int = 0
    lost: int = 0  # regression cases the candidate lost beyond the margin
    regressions: tuple[str, ...] = ()  # the first MAX_LOST_IDS of their ids (a tag holds only so many)
    worst_loss: float = 0.0  # the most nats per token a case lost (0 when none lost any)
    regression_set: str = ""  # the stored version scored

    def as_tags(self) -> dict[str, str]:
        return {
            "gate.replay_cases": str(self.replay_cases), "gate.replay_wins": str(self.candidate_wins),
            "gate.replay_champion_wins": str(self.reference_wins), "gate.replay_margin": f"{self.candidate_margin:.4f}",
            "gate.replay_champion_margin": f"{self.reference_margin:.4f}",
            "gate.regression_cases": str(self.regression_cases), "gate.regressions": str(self.lost),
            "gate.regression_ids": ",".join(self.regressions), "gate.regression_worst": f"{self.worst_loss:.4f}",
            "gate.regression_set": self.regression_set,
        }  # fmt: skip

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> CaseScores | None:
        """The scores tagged on a version (margins as tagged, to 4 places); None when it was evaluated without them."""
        try:
            ids = tuple(filter(None, tags["gate.regression_ids"].split(",")))
            scores = cls(int(tags["gate.replay_cases"]), int(tags["gate.replay_wins"]),
                         int(tags["gate.replay_champion_wins"]), float(tags["gate.replay_margin"]),
                         float(tags["gate.replay_champion_margin"]), int(tags["gate.regression_cases"]),
                         int(tags["gate.regressions"]), ids, float(tags["gate.regression_worst"]),
                         tags.get("gate.regression_set", ""))  # fmt: skip
        except (KeyError, ValueError):
            return None
        return scores if len(ids) == min(scores.lost, MAX_LOST_IDS) else None


@dataclass(frozen=True)
class CasePolicy:
    """Thresholds on the cases users gave (settings ``gate_*``)."""

    min_replay_accuracy: float = 0.0
    replay_margin: float = 0.1  # nats per token the mean replay margin may trail the reference's
    regression_margin: float = 0.1  # nats per token a regression case may lose
    max_regressions: int = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> CasePolicy:
        return cls(settings.gate_min_replay_accuracy, settings.gate_replay_margin, settings.gate_regression_margin,
                   settings.gate_max_regressions)  # fmt: skip


def case_gate(scores: CaseScores | None, policy: CasePolicy, reference: str = "the champion") -> tuple[bool, str]:
    """Whether the candidate passes the replay and regression cases, and why (see the module docstring)."""
    if scores is None:
        return False, "no replay/regression scores on the candidate: re-run evaluate"
    replay = "no replayed correction"
    if scores.replay_cases:
        n, wins = scores.replay_cases, scores.candidate_wins
        replay = (f"prefers {wins} of {n} replayed corrections by {scores.candidate_margin:+.3f} nats/token "
                  f"({reference}: {scores.reference_wins}, {scores.reference_margin:+.3f})")  # fmt: skip
        if wins < math.ceil(policy.min_replay_accuracy * n - 1e-9):
            return False, f"{replay}: fewer than {policy.min_replay_accuracy:.0%}"
        if scores.candidate_margin < scores.reference_margin - policy.replay_margin:
            return False, f"{replay}: trails {reference} by more than {policy.replay_margin:g} nats/token"
    lost = scores.lost
    regression = (f"{lost} of {scores.regression_cases} regression case(s) less likely by more than "
                  f"{policy.regression_margin:g} nats/token (worst {scores.worst_loss:.3f})")  # fmt: skip
    if lost > policy.max_regressions:
        which = ", ".join(scores.regressions[:5])
        return False, f"{replay}; {regression}, more than the {policy.max_regressions} allowed: {which}"
    return True, f"{replay}; {regression}"


PREFERENCE_OBJECTIVES = ("dpo", "kto")


def preference_learned(scores: CaseScores | None, tags: dict[str, str], reference: str) -> tuple[bool, str]:
    """A DPO/KTO candidate must show it learned the preferences: a higher mean margin than ``reference``
    on the replayed corrections; with none replayed, a held-out preference accuracy above its base's
    (``training.*preference_accuracy``, tagged by ``training.dpo``)."""
    if scores is not None and scores.replay_cases:
        if scores.candidate_margin > scores.reference_margin:
            return True, f"learned: the replayed corrections gained over {reference}"
        return False, (f"a preference candidate must prefer the replayed corrections more than {reference} "
                       f"({scores.candidate_margin:+.3f} vs {scores.reference_margin:+.3f} nats/token)")  # fmt: skip
    before, after = (
        _float(tags.get("training.base_preference_accuracy")),
        _float(tags.get("training.preference_accuracy")),
    )
    if before is not None and after is not None and after > before:
        return True, f"learned: held-out preference accuracy {before:.2f} -> {after:.2f}"
    return False, ("a preference candidate with no replayed correction needs a held-out preference accuracy "
                   f"above its base's ({before} -> {after})")  # fmt: skip


def case_items(replay: list[dict], regression: list[dict]) -> list[tuple[list[dict], str]]:
    """The completions the cases score, in order: each replay pair's chosen and rejected, then each regression
    case's (``ray_app.regression``)."""
    items = [(case["messages"], case[side]) for case in replay for side in ("chosen", "rejected")]
    return items + [(case["messages"], case["completion"]) for case in regression]


def compare_cases(ours: list[tuple[float, int]], theirs: list[tuple[float, int]], replay: list[dict],
                  regression: list[dict], margin: float, regression_set: str = "") -> CaseScores:  # fmt: skip
    """The candidate's and its reference's scores of :func:`case_items` (``(summed log-prob, tokens)`` each,
    ``training.evaluate.completion_scores``) compared as the gate judges them."""

    def margins(scores: list[tuple[float, int]]) -> list[float]:
        per_token = [logp / max(tokens, 1) for logp, tokens in scores[: 2 * len(replay)]]
        return [chosen - rejected for chosen, rejected in zip(per_token[::2], per_token[1::2], strict=True)]

    def mean(values: list[float]) -> float:
        return sum(values) / len(values) if values else 0.0

    losses = {}
    for case, (logp, tokens), (ref_logp, _) in zip(regression, ours[2 * len(replay):], theirs[2 * len(replay):],
                                                   strict=True):  # fmt: skip
        if tokens:
            losses[case["id"]] = (ref_logp - logp) / tokens
    lost = [case_id for case_id, loss in losses.items() if loss > margin]
    mine, its = margins(ours), margins(theirs)
    return CaseScores(len(replay), sum(m > 0 for m in mine), sum(m > 0 for m in its), mean(mine), mean(its),
                      len(losses), len(lost), tuple(lost[:MAX_LOST_IDS]), max([0.0, *losses.values()]),
                      regression_set)  # fmt: skip


def chat_cases(name: str, settings: Settings) -> tuple[list[dict], list[dict], str]:
    """The chat's replay pairs and regression cases for ``name`` (the regression set grown first), and the
    stored regression set they come from."""
    from ray_app.chat.feedback import read_feedback
    from ray_app.chat.review import ReviewPolicy
    from ray_app.regression import grow_regression_set, regression_cases, replay_cases, replay_since

    records = read_feedback(settings.chat_database_url)
    policy = ReviewPolicy.from_settings(settings)
    replay = replay_cases(records, policy, replay_since(settings.gate_replay_days))
    kept = grow_regression_set(name, regression_cases(records, policy), settings)
    return replay, kept.cases, kept.uri


@dataclass
class Side:
    """One side of a gate: a model reference with a LoRA ``adapter`` on it (None: none), and its held-out loss
    when it is already known (not evaluated again)."""

    model: str
    adapter: str | None = None
    known_loss: float | None = None


def measure_sides(name: str, candidate: Side, reference: Side, cfg, settings: Settings,
                  prompts=()) -> tuple[tuple[float, float], CaseScores, list[dict[str, Any]]]:  # fmt: skip
    """The held-out losses of ``candidate`` and ``reference`` on ``cfg.eval_data`` and their comparison on the
    chat's cases for ``name``, each side's model loaded once; and the candidate's answers to ``prompts``."""
    from training.evaluate import completion_scores, evaluate_model

    replay, regression, regression_set = chat_cases(name, settings)
    items = case_items(replay, regression)
    measured = []
    for side, asked in ((candidate, prompts), (reference, ())):
        if side.known_loss is not None:
            scores = completion_scores(side.model, items, cfg.seq_len, settings, side.adapter) if items else []
            measured.append((side.known_loss, scores, []))
            continue
        report = evaluate_model(side.model, cfg.eval_data, cfg.seq_len, settings, prompts=asked,
                                max_new_tokens=cfg.max_new_tokens, adapter=side.adapter, completions=items)  # fmt: skip
        measured.append((report.loss, report.scores, report.samples))
    (ours_loss, ours, samples), (theirs_loss, theirs, _) = measured
    cases = compare_cases(ours, theirs, replay, regression, settings.gate_regression_margin, regression_set)
    return (ours_loss, theirs_loss), cases, samples


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
    cases: CaseScores = field(default_factory=CaseScores)


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

    name = _registered_name(cfg)
    if not cfg.eval_data:
        raise PromotionError("the config has no eval_data: the gate needs a held-out set")
    candidate = get_version(f"models:/{name}/{version}", settings)
    champion = champion_of(name, settings)
    candidate_ref = f"models:/{name}/{candidate.version}"
    reference = reference_for(name, champion, cfg.model)
    known = known_losses or {}
    sides = Side(candidate_ref, known_loss=known.get(candidate_ref)), Side(reference, known_loss=known.get(reference))
    (candidate_loss, reference_loss), cases, samples = measure_sides(name, *sides, cfg, settings, cfg.sample_prompts)
    mlflow = client(settings)
    tags = {GATE_CANDIDATE_LOSS: f"{candidate_loss:.6f}", GATE_CHAMPION_LOSS: f"{reference_loss:.6f}",
            **cases.as_tags(), GATE_CHAMPION: reference}  # the reference last: decide() checks it  # fmt: skip
    for key, value in tags.items():
        mlflow.set_model_version_tag(name, candidate.version, key, value)
    if candidate.run_id:
        metrics = {"gate_candidate_loss": candidate_loss, "gate_champion_loss": reference_loss,
                   "gate_replay_wins": cases.candidate_wins, "gate_regressions": cases.lost}  # fmt: skip
        for key, value in metrics.items():
            mlflow.log_metric(candidate.run_id, key, value)
    champion_version = champion.version if champion else None
    return GateEvaluation(name, candidate.version, candidate_loss, reference, champion_version, reference_loss,
                          list(cfg.eval_data), samples, cases)  # fmt: skip


def decide(
    cfg, settings: Settings, version: str, margin: float | None, actor: str, rollout: bool = True,
    canary_share: float = 0.0,
) -> dict[str, Any]:  # fmt: skip
    """Apply the offline gate to evaluated ``version``; promote it atomically if it wins, else record the rejection.

    Refuses (PromotionError) a version not evaluated, or evaluated against a champion that has
    moved since. ``margin`` None is ``settings.promotion_min_improvement``; ``rollout`` False moves
    the alias without rolling Serve (``llmops promote --no-rollout``). With ``canary_share`` > 0, a
    winner is first served as a canary beside the champion (``result["canary"]``; the alias stays,
    :func:`await_canary` decides) - unless there is no champion or no Serve app serves it: no live
    traffic to judge, so it is promoted on the gate alone (the reason says so).
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
    gate = _full_gate(tags, margin, current, settings)
    if not gate.promoted:
        record_promotion(name, version, previous, "rejected", gate.reason, settings, actor=actor)
        return {"name": name, "version": version, "promoted": False, "reason": gate.reason, "previous": previous}
    reason = gate.reason
    if canary_share and rollout and previous is not None:
        canary, why = _canary_for(name, version, canary_share, settings, actor)
        if canary is not None:
            return {"name": name, "version": version, "promoted": False, "canary": canary, "previous": previous,
                    "reason": f"{gate.reason}; {why}"}  # fmt: skip
        reason = f"{gate.reason}; {why}"
    # Atomic: Serve's champion apps run the new version before the alias moves (or nothing changes).
    promotion = promote(name, settings, version=version, rollout=rollout, actor=actor)
    return {"name": name, "version": version, "promoted": True, "reason": reason, "previous": previous,
            "rolled_apps": promotion.rolled_apps}  # fmt: skip


def _full_gate(tags: dict[str, str], margin: float, reference: str, settings: Settings) -> GateDecision:
    """The offline gate on an evaluated version's tags: its loss, the cases users gave and, for a
    preference candidate (``training.objective`` dpo/kto), what it learned."""
    preference = tags.get("training.objective", "sft") in PREFERENCE_OBJECTIVES
    tolerance = settings.gate_preference_loss_tolerance if preference else None
    candidate, champion = _float(tags.get(GATE_CANDIDATE_LOSS)), _float(tags.get(GATE_CHAMPION_LOSS))
    gate = offline_gate(candidate, champion, margin, reference, tolerance)
    scores = CaseScores.from_tags(tags)
    passed, why = case_gate(scores, CasePolicy.from_settings(settings), reference)
    if preference and passed:
        passed, learned = preference_learned(scores, tags, reference)
        why = f"{why}; {learned}"
    return dataclasses.replace(gate, promoted=gate.promoted and passed, reason=f"{gate.reason}; {why}")


def _canary_for(name: str, version: str, share: float, settings: Settings, actor: str) -> tuple[dict | None, str]:
    """Serve ``version`` as the canary of ``name`` (or find it served so already): (its description, why).

    (None, why) when no Serve app serves the champion: there is no traffic to judge it on.
    """
    from ray_app.serving.rollout import champion_apps, running_config, start_canary

    apps = champion_apps(name, settings)
    if not apps:
        return None, f"no Serve app serves models:/{name}@champion: promoted without a canary"
    running = [app for app in running_config(settings)["applications"] if app["name"] in apps
               and ((app.get("args") or {}).get("canary") or {}).get("model_version") == version]  # fmt: skip
    if running:  # a retried step: the canary it started runs on
        spec = running[0]["args"]["canary"]
        share, sticky_by, apps = spec["share"], spec.get("sticky_by"), [app["name"] for app in running]
    else:
        started = start_canary(name, settings, version=version, share=share, actor=actor)
        share, sticky_by, apps = started.share, started.sticky_by, started.apps
    canary = {"version": version, "share": share, "sticky_by": sticky_by, "apps": apps}
    return canary, f"canary for {share:.0%} of conversations (sticky by {sticky_by}) in {', '.join(apps)}"


def _registered_name(cfg) -> str:
    if not cfg.registered_model:
        raise PromotionError("the config has no registered_model: nothing to evaluate or promote")
    return cfg.registered_model


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except ValueError:
        return None


# --- the canary policy: live signals and user feedback, per version --------------------------
@dataclass(frozen=True)
class VersionSignals:
    """What one version did during a canary's window: requests, their failures, latency, feedback."""

    requests: int = 0
    server_errors: int = 0  # 5xx answers
    ttft_p95_s: float | None = None
    ratings: int = 0  # thumbs up or down in the chat
    thumbs_down: int = 0
    corrections: int = 0  # thumbs-down with a `correction:` comment


@dataclass(frozen=True)
class CanaryPolicy:
    """Thresholds of the canary decision (settings ``canary_*``)."""

    window_s: float = 3600.0  # no promotion before it has run this long
    max_error_ratio: float = 0.05  # above it (with min_requests): roll back at once
    min_requests: int = 20
    latency_margin: float = 0.5  # canary TTFT p95 may exceed the champion's by this fraction...
    latency_floor_s: float = 0.5  # ...or by this much in absolute terms, whichever is larger
    worse_probability: float = 0.95  # P(canary's thumbs-down rate > champion's) above it: roll back
    min_ratings: int = 10  # promote only with this many ratings of the canary

    @classmethod
    def from_settings(cls, settings: Settings) -> CanaryPolicy:
        return cls(
            window_s=settings.canary_window_s,
            max_error_ratio=settings.canary_max_error_ratio,
            min_requests=settings.canary_min_requests,
            latency_margin=settings.canary_latency_margin,
            latency_floor_s=settings.canary_latency_floor_s,
            worse_probability=settings.canary_worse_probability,
            min_ratings=settings.canary_min_ratings,
        )


@dataclass(frozen=True)
class CanaryVerdict:
    """``promote``, ``rollback`` or ``wait``, why, and the evidence (recorded as tags on the version)."""

    action: str
    reason: str
    evidence: dict[str, str]


def canary_verdict(
    champion: VersionSignals, canary: VersionSignals, elapsed_s: float, policy: CanaryPolicy
) -> CanaryVerdict:
    """Judge a canary: roll back at once on hard failure or feedback clearly worse; promote after the window.

    Feedback is compared with a Bayesian test suited to small counts: with uniform priors, the
    thumbs-down rates are Beta(1 + down, 1 + up); the canary is judged worse when
    P(rate_canary > rate_champion) exceeds ``worse_probability`` (exact, not sampled).
    """
    evidence = {
        "window_s": f"{elapsed_s:.0f}",
        "champion": _describe(champion),
        "canary": _describe(canary),
    }
    worse = probability_worse(canary.thumbs_down, canary.ratings, champion.thumbs_down, champion.ratings)
    evidence["p_feedback_worse"] = f"{worse:.4f}"

    def verdict(action: str, reason: str) -> CanaryVerdict:
        return CanaryVerdict(action, reason, evidence)

    if canary.requests >= policy.min_requests and canary.server_errors / canary.requests > policy.max_error_ratio:
        ratio = canary.server_errors / canary.requests
        return verdict("rollback", f"error ratio {ratio:.1%} above {policy.max_error_ratio:.1%}")
    if worse > policy.worse_probability:
        return verdict("rollback", f"thumbs-down more likely than the champion's (p={worse:.3f})")
    slow = _too_slow(champion, canary, policy)
    if slow:
        return verdict("rollback", slow)
    if elapsed_s < policy.window_s:
        return verdict("wait", f"{elapsed_s:.0f} of {policy.window_s:.0f} s observed")
    if canary.ratings < policy.min_ratings:
        return verdict("rollback", f"window over with {canary.ratings} rating(s), fewer than {policy.min_ratings}")
    return verdict("promote", f"no signal worse over {elapsed_s:.0f} s (feedback p={worse:.3f})")


def probability_worse(down_b: int, ratings_b: int, down_a: int, ratings_a: int) -> float:
    """P(rate_B > rate_A) for thumbs-down rates with Beta(1 + down, 1 + up) posteriors (exact sum)."""
    alpha_a, beta_a = 1 + down_a, 1 + ratings_a - down_a
    alpha_b, beta_b = 1 + down_b, 1 + ratings_b - down_b
    total = 0.0
    for i in range(alpha_b):
        total += math.exp(
            _log_beta(alpha_a + i, beta_a + beta_b)
            - math.log(beta_b + i)
            - _log_beta(1 + i, beta_b)
            - _log_beta(alpha_a, beta_a)
        )
    return min(1.0, max(0.0, total))


def _log_beta(a: float, b: float) -> float:
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def _too_slow(champion: VersionSignals, canary: VersionSignals, policy: CanaryPolicy) -> str:
    if champion.ttft_p95_s is None or canary.ttft_p95_s is None or canary.requests < policy.min_requests:
        return ""
    allowed = champion.ttft_p95_s + max(champion.ttft_p95_s * policy.latency_margin, policy.latency_floor_s)
    if canary.ttft_p95_s > allowed:
        return f"TTFT p95 {canary.ttft_p95_s:.2f} s above {allowed:.2f} s (champion {champion.ttft_p95_s:.2f} s)"
    return ""


def _describe(signals: VersionSignals) -> str:
    ttft = "n/a" if signals.ttft_p95_s is None else f"{signals.ttft_p95_s:.3f}s"
    return (f"requests={signals.requests} 5xx={signals.server_errors} ttft_p95={ttft} ratings={signals.ratings} "
            f"down={signals.thumbs_down} corrections={signals.corrections}")  # fmt: skip


def canary_signals(name: str, champion: str, canary: str, settings: Settings, window_s: float) -> dict:
    """Per-version signals of a running canary (see :func:`signals_of`), keyed by version."""
    return signals_of({v: f"{name}/{v}" for v in (champion, canary)}, settings, window_s)


def signals_of(labels: dict[str, str], settings: Settings, window_s: float) -> dict[str, VersionSignals]:
    """Signals of what answered as each label (NAME/VERSION, or NAME/VERSION:ADAPTER for an adapter), keyed
    like ``labels``: requests and 5xx and TTFT p95 from Prometheus, chat feedback.

    Requests count what the apps' API answered since their ingress last started (a canary's
    start restarts it); TTFT p95 is over the last ``window_s``; feedback is every rating the
    chat database holds per label (the canary's are all from its canary). Raises
    MonitoringError naming Prometheus when it cannot be read: no decision is taken blind.
    """
    from ray_app import monitoring

    versions = "|".join(labels.values())  # names are letters, digits, '.', '_', '-' ('.' matches itself too)
    selector = f'model_version=~"{versions}"'
    answered = monitoring.query(settings, "sum by (model_version, code) (ray_llmops_requests_total"
                                f'{{{selector}, route=~"/v1/(chat/)?completions"}})')  # fmt: skip
    window = f"{max(int(window_s), 60)}s"
    buckets = f"ray_llmops_time_to_first_token_s_bucket{{{selector}}}[{window}]"
    ttft = monitoring.query(settings, f"histogram_quantile(0.95, sum by (le, model_version) (rate({buckets})))")
    ratings, corrections = _feedback_by_version(settings)
    signals = {}
    for version, label in labels.items():
        counts = [(row["metric"].get("code", ""), float(row["value"][1])) for row in answered
                  if row["metric"].get("model_version") == label]  # fmt: skip
        p95 = [float(row["value"][1]) for row in ttft if row["metric"].get("model_version") == label]
        signals[version] = VersionSignals(
            requests=int(sum(count for _, count in counts)),
            server_errors=int(sum(count for code, count in counts if code.startswith("5"))),
            ttft_p95_s=p95[0] if p95 and math.isfinite(p95[0]) else None,
            ratings=ratings[label, "up"] + ratings[label, "down"],
            thumbs_down=ratings[label, "down"],
            corrections=corrections[label],
        )
    return signals


def _feedback_by_version(settings: Settings):
    """(ratings by (model_version, up/down), corrections by model_version) from the chat database."""
    from collections import Counter

    import sqlalchemy as sa

    from ray_app.chat.feedback import chat_database_missing
    from ray_app.chat.metrics import feedback_counts
    from ray_app.chat.schema import sync_url

    url = str(settings.chat_database_url)
    if chat_database_missing(url):  # the chat never ran: no feedback (and nothing created)
        return Counter(), Counter()
    engine = sa.create_engine(sync_url(url))
    try:
        return feedback_counts(engine)
    finally:
        engine.dispose()


def judge_canary(
    name: str, settings: Settings, policy: CanaryPolicy | None = None, actor: str = "", version: str | None = None
) -> CanaryVerdict:
    """Judge the canary running for ``name`` once, and act: promote it (atomic), roll it back, or wait.

    The verdict and its evidence are tagged on the canary's version (``canary.verdict``,
    ``canary.evidence.*``). Raises PromotionError when no canary runs, or (``version`` given)
    when that version is not the one running.
    """
    from ray_app.registry import client, get_version
    from ray_app.serving.rollout import canary_versions, promote, running_config, stop_canary

    policy = policy or CanaryPolicy.from_settings(settings)
    running = sorted(canary_versions(running_config(settings), name))
    if not running:
        raise PromotionError(f"no canary of {name} is running in Serve")
    if version is not None and version not in running:
        raise PromotionError(f"version {version} of {name} is not running as a canary in Serve")
    canary = version or running[0]
    champion = get_version(f"models:/{name}@champion", settings).version
    started = get_version(f"models:/{name}/{canary}", settings).tags.get("canary.running_at", "")
    elapsed = time.time() - calendar.timegm(time.strptime(started, "%Y-%m-%dT%H:%M:%SZ")) if started else 0.0
    signals = canary_signals(name, champion, canary, settings, min(elapsed, policy.window_s) or 60)
    verdict = canary_verdict(signals[champion], signals[canary], elapsed, policy)
    mlflow = client(settings)
    tags = {"canary.verdict": verdict.action, "canary.verdict_reason": verdict.reason,
            **{f"canary.evidence.{key}": value for key, value in verdict.evidence.items()}}  # fmt: skip
    for key, value in tags.items():
        mlflow.set_model_version_tag(name, canary, key, value)
    actor = actor or "ray_app.promotion.judge_canary"
    if verdict.action == "promote":
        promote(name, settings, version=canary, rollout=True, actor=actor)
    elif verdict.action == "rollback":
        stop_canary(name, settings, verdict.reason, actor=actor)
    return verdict


def judge_adapter_canary(
    name: str, alias: str, settings: Settings, policy: CanaryPolicy | None = None, actor: str = "",
    adapter: str | None = None,
) -> CanaryVerdict:  # fmt: skip
    """Judge the canary adapter of ``NAME:ALIAS`` once against the adapter the alias names, by the versions'
    policy on their labels (NAME/VERSION:ADAPTER), and act: promote it, roll it back, or wait.

    The verdict and its evidence are tagged on the champion version (``adapter_canary.ALIAS.verdict``,
    ``...evidence.*``). Raises PromotionError when no canary of the alias runs, or (``adapter`` given) when
    that adapter is not the one running.
    """
    from ray_app.registry import get_version, tag_version
    from ray_app.serving.adapter_rollout import (
        CANARY_TAG,
        adapter_canaries,
        current_adapter,
        promote_adapter,
        stop_adapter_canary,
    )
    from ray_app.serving.rollout import running_config

    policy = policy or CanaryPolicy.from_settings(settings)
    config = running_config(settings)
    running = sorted(adapter_canaries(config, name).get(alias, ()))
    if not running:
        raise PromotionError(f"no canary of {name}:{alias} is running in Serve")
    if adapter is not None and adapter not in running:
        raise PromotionError(f"adapter {adapter!r} is not running as the canary of {name}:{alias} in Serve")
    version = get_version(f"models:/{name}@champion", settings).version
    champion, canary = current_adapter(name, alias, settings, version, config), running[0]
    key = f"{CANARY_TAG}{alias}"
    started = get_version(f"models:/{name}/{version}", settings).tags.get(f"{key}.running_at", "")
    elapsed = time.time() - calendar.timegm(time.strptime(started, "%Y-%m-%dT%H:%M:%SZ")) if started else 0.0
    labels = {adapter: f"{name}/{version}:{adapter}" for adapter in (champion, canary)}
    signals = signals_of(labels, settings, min(elapsed, policy.window_s) or 60)
    verdict = canary_verdict(signals[champion], signals[canary], elapsed, policy)
    tags = {f"{key}.verdict": verdict.action, f"{key}.verdict_reason": verdict.reason,
            **{f"{key}.evidence.{item}": value for item, value in verdict.evidence.items()}}  # fmt: skip
    tag_version(name, version, tags, settings)
    actor = actor or "ray_app.promotion.judge_adapter_canary"
    if verdict.action == "promote":
        promote_adapter(name, alias, canary, settings, actor=actor)
    elif verdict.action == "rollback":
        stop_adapter_canary(name, alias, settings, verdict.reason, actor=actor)
    return verdict


ADAPTER_GATE = "adapter_gate."  # + ALIAS: the evaluation of the last adapter gated for NAME:ALIAS
# The evaluation's tags under ADAPTER_GATE + ALIAS + "." and the versions' gate tags (gate.*) they hold: one
# map, for writing them (evaluate_adapter) and reading them back (decide_adapter).
_ADAPTER_GATE_TAGS = {"candidate_loss": GATE_CANDIDATE_LOSS, "reference_loss": GATE_CHAMPION_LOSS,
                      **{key.removeprefix("gate."): key for key in CaseScores().as_tags()}}  # fmt: skip


def gate_adapter(
    cfg, settings: Settings, name: str, alias: str, adapter: str, margin: float | None = None, actor: str = "",
    canary_share: float = 0.0,
) -> dict[str, Any]:  # fmt: skip
    """The offline gate for ``NAME:ALIAS`` moving to the stored ``adapter`` of the champion, then the move:
    :func:`evaluate_adapter`, then :func:`decide_adapter` (``llmops promote NAME:ALIAS --adapter A --gate``)."""
    evaluation = evaluate_adapter(cfg, settings, name, alias, adapter)
    decision = decide_adapter(settings, name, alias, adapter, margin, actor, canary_share)
    return {**evaluation, **decision}


def evaluate_adapter(cfg, settings: Settings, name: str, alias: str, adapter: str) -> dict[str, Any]:
    """Evaluate the champion with ``adapter`` and its reference, the champion with the adapter ``NAME:ALIAS``
    names now (the champion alone for a new alias), on ``cfg.eval_data`` and the chat's cases.

    The evaluation is tagged on the champion version (``adapter_gate.ALIAS.*``: what
    :func:`decide_adapter` reads). Raises PromotionError without eval_data, ValueError when the adapter
    is not stored for the champion.
    """
    from ray_app.adapters import adapter_key
    from ray_app.registry import tag_version
    from ray_app.serving.adapter_rollout import plan_adapter
    from ray_app.storage import open_store

    if not cfg.eval_data:
        raise PromotionError("the config has no eval_data: the gate needs a held-out set")
    plan = plan_adapter(name, alias, adapter, settings)
    result = {"name": name, "alias": alias, "adapter": adapter, "version": plan.version, "previous": plan.previous}
    if plan.previous == adapter:
        return {**result, "note": f"{name}:{alias} already is answered by {adapter!r}: nothing to evaluate"}
    store, base = open_store(settings=settings), f"models:/{name}/{plan.version}"
    adapters = (adapter, plan.previous)  # the reference's is None for a new alias: the base alone
    sides = [Side(base, store.uri(adapter_key(name, plan.version, one)) if one else None) for one in adapters]
    losses, cases, _samples = measure_sides(name, *sides, cfg, settings)
    key, reference = f"{ADAPTER_GATE}{alias}", _adapter_reference(base, plan.previous)
    evaluated = {GATE_CANDIDATE_LOSS: f"{losses[0]:.6f}", GATE_CHAMPION_LOSS: f"{losses[1]:.6f}", **cases.as_tags()}
    tags = {key: adapter, f"{key}.reference": reference, f"{key}.eval_data": ",".join(cfg.eval_data)[:4000],
            **{f"{key}.{item}": evaluated[gate] for item, gate in _ADAPTER_GATE_TAGS.items()}}  # fmt: skip
    tag_version(name, plan.version, tags, settings)
    return {**result, "reference": reference, "candidate_loss": losses[0], "reference_loss": losses[1],
            "eval_data": list(cfg.eval_data), "cases": dataclasses.asdict(cases)}  # fmt: skip


def decide_adapter(
    settings: Settings, name: str, alias: str, adapter: str, margin: float | None = None, actor: str = "",
    canary_share: float = 0.0,
) -> dict[str, Any]:  # fmt: skip
    """Apply the versions' offline gate (``_full_gate``: loss, cases, and for a preference adapter what it
    learned) to the evaluation :func:`evaluate_adapter` tagged, and act on it.

    A loser is recorded rejected (``adapter_promotion.ALIAS``) and nothing moves; a winner is promoted
    (``promote_adapter``) or, with ``canary_share`` and an adapter already behind the alias, served as the
    alias's canary first (``result["canary"]``; :func:`judge_adapter_canary` decides) - unless no Serve app
    serves the champion with adapters: no traffic to judge, promoted on the gate alone. Refuses
    (PromotionError) an adapter not evaluated, or evaluated against what the alias named before.
    """
    from ray_app.adapters import lineages
    from ray_app.registry import get_version
    from ray_app.serving.adapter_rollout import plan_adapter, promote_adapter, reject_adapter

    margin = settings.promotion_min_improvement if margin is None else margin
    plan = plan_adapter(name, alias, adapter, settings)
    result = {"name": name, "alias": alias, "adapter": adapter, "version": plan.version, "previous": plan.previous}
    if plan.previous == adapter:
        return {**result, "promoted": True, "reason": f"{name}:{alias} already is answered by {adapter!r}"}
    tags, key = get_version(f"models:/{name}/{plan.version}", settings).tags, f"{ADAPTER_GATE}{alias}"
    if tags.get(key) != adapter:
        raise PromotionError(f"{name}:{alias} -> {adapter} has not been evaluated ({key} names "
                             f"{tags.get(key) or 'nothing'}): run evaluate first")  # fmt: skip
    reference = _adapter_reference(f"models:/{name}/{plan.version}", plan.previous)
    if tags.get(f"{key}.reference") != reference:
        raise PromotionError(f"what {name}:{alias} answers with changed since the evaluation "
                             f"({tags.get(f'{key}.reference')} -> {reference}); re-run evaluate")  # fmt: skip
    evaluated = {gate: tags.get(f"{key}.{item}", "") for item, gate in _ADAPTER_GATE_TAGS.items()}
    gate = _full_gate({**lineages(tags).get(adapter, {}), **evaluated}, margin, reference, settings)
    actor = actor or "ray_app.promotion.decide_adapter"
    if not gate.promoted:
        reject_adapter(plan, gate.reason, settings, actor)
        return {**result, "promoted": False, "reason": gate.reason}
    reason = gate.reason
    if canary_share and plan.previous is not None:
        canary, why = _adapter_canary_for(plan, canary_share, settings, actor)
        if canary is not None:
            return {**result, "promoted": False, "canary": canary, "reason": f"{gate.reason}; {why}"}
        reason = f"{gate.reason}; {why}"
    done = promote_adapter(name, alias, adapter, settings, actor=actor)
    return {**result, "promoted": True, "apps": done.apps, "reason": reason}


def _adapter_reference(base: str, adapter: str | None) -> str:
    """What an adapter is compared with: the base version with the alias's adapter, or alone."""
    return f"{base}:{adapter}" if adapter else base


def _adapter_canary_for(plan, share: float, settings: Settings, actor: str) -> tuple[dict | None, str]:
    """Serve ``plan.adapter`` as the canary of ``NAME:ALIAS`` (or find it served so already): (its
    description, why); (None, why) when no Serve app serves the champion with adapters."""
    from ray_app.serving.adapter_rollout import adapter_apps, adapter_canaries, start_adapter_canary
    from ray_app.serving.rollout import running_config

    config = running_config(settings)
    apps = adapter_apps(config, plan.name)
    if not apps:
        return None, f"no Serve app serves models:/{plan.name}@champion with adapters: promoted without a canary"
    if plan.adapter not in adapter_canaries(config, plan.name).get(plan.alias, ()):  # else a retried step's
        apps = start_adapter_canary(plan.name, plan.alias, plan.adapter, settings, share=share, actor=actor).apps
    canary = {"adapter": plan.adapter, "share": share, "sticky_by": settings.canary_sticky_by, "apps": apps}
    why = f"canary for {canary['share']:.0%} of {plan.name}:{plan.alias}'s conversations beside {plan.previous}"
    return canary, f"{why} (sticky by {canary['sticky_by']}) in {', '.join(apps)}"


def await_canary(
    name: str, version: str, settings: Settings, policy: CanaryPolicy | None = None, every_s: float = 60.0,
    actor: str = "", echo=None,
) -> CanaryVerdict:  # fmt: skip
    """Judge the canary ``version`` of ``name`` every ``every_s`` until it is promoted or rolled back.

    Each verdict is echoed (a Ray job's log, hence the Airflow task's) and tagged on the version.
    Raises PromotionError when ``version`` is not (or no longer) running as a canary.
    """
    judge = functools.partial(judge_canary, name, settings, policy, actor, version=version)
    return _await(judge, f"canary {name} v{version}", every_s, echo)


def await_adapter_canary(
    name: str, alias: str, adapter: str, settings: Settings, policy: CanaryPolicy | None = None,
    every_s: float = 60.0, actor: str = "", echo=None,
) -> CanaryVerdict:  # fmt: skip
    """Judge ``adapter``, the canary of ``NAME:ALIAS``, every ``every_s`` until it is promoted or rolled back
    (:func:`await_canary` for adapters). Raises PromotionError when it is not (or no longer) running."""
    judge = functools.partial(judge_adapter_canary, name, alias, settings, policy, actor, adapter=adapter)
    return _await(judge, f"canary {name}:{alias} {adapter}", every_s, echo)


def _await(judge, label: str, every_s: float, echo) -> CanaryVerdict:
    """Call ``judge()`` every ``every_s`` until its verdict is not ``wait``; each verdict echoed."""
    while True:
        verdict = judge()
        (echo or _say)(f"{label}: {verdict.action}: {verdict.reason}")
        if verdict.action != "wait":
            return verdict
        time.sleep(every_s)


def _say(line: str) -> None:
    print(line, flush=True)
