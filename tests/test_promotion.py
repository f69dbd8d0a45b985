"""The promotion policy (ray_app.promotion): the offline gate pinned, its decisions on a real MLflow registry."""

from __future__ import annotations

import math
import uuid
from pathlib import Path

import pytest

from ray_app.promotion import PromotionError, decide, offline_gate, reference_for
from ray_app.settings import Settings, SettingsError

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("candidate", "reference", "margin", "promoted"),
    [
        (1.0, 2.0, 0.0, True),
        (1.99, 2.0, 0.0, True),
        (2.0, 2.0, 0.0, False),  # a tie keeps the champion
        (2.1, 2.0, 0.0, False),
        (1.99, 2.0, 0.01, False),  # 0.5% better is not the 1% asked for
        (1.979, 2.0, 0.01, True),
        (1.98, 2.0, 0.01, False),  # exactly the margin: a tie
        (0.5, 2.0, 0.75, False),  # 75% margin: needs < 0.5
        (0.49, 2.0, 0.75, True),
    ],
)
def test_the_offline_gate_promotes_only_a_candidate_lower_by_the_margin(candidate, reference, margin, promoted):
    decision = offline_gate(candidate, reference, margin, reference="models:/chat/3")
    assert decision.promoted is promoted, decision.reason
    assert "vs models:/chat/3" in decision.reason and f"margin {margin:g}" in decision.reason
    assert (decision.candidate_loss, decision.reference_loss, decision.margin) == (candidate, reference, margin)


@pytest.mark.parametrize("missing", [None, math.nan, math.inf])
def test_missing_or_unusable_losses_promote_nothing(missing):
    no_candidate = offline_gate(missing, 2.0, 0.01)
    assert not no_candidate.promoted and "the candidate has no usable held-out loss" in no_candidate.reason
    no_reference = offline_gate(1.0, missing, 0.01, reference="the base model")
    assert not no_reference.promoted and "the base model has no usable held-out loss" in no_reference.reason


@pytest.mark.parametrize("margin", [-0.1, 1.0, 2, "0.1", None])
def test_a_margin_that_is_not_a_fraction_is_refused_naming_the_setting(margin):
    with pytest.raises(ValueError, match="promotion_min_improvement"):
        offline_gate(1.0, 2.0, margin)


def test_without_a_champion_the_reference_is_the_base_model():
    class Champion:
        version = "4"

    assert reference_for("chat", Champion(), "base/model") == "models:/chat/4"
    assert reference_for("chat", None, "base/model") == "base/model"
    assert reference_for("chat", None, None) == "default"


def test_decide_records_a_rejection_and_refuses_an_unevaluated_or_stale_evaluation(mlflow_server: Settings):
    """The DAG's, the demo's and the CLI's decision step on a real registry: a candidate that
    loses against the base model is tagged rejected (alias unmoved); one with no gate.* tags,
    or evaluated against a champion that has moved since, is refused."""
    from mlflow import MlflowClient

    from ray_app.registry import register_model_version
    from training.config import SFTConfig

    name = f"gate-{uuid.uuid4().hex[:6]}"
    cfg = SFTConfig.model_construct(registered_model=name, model="base/model")
    client = MlflowClient(mlflow_server.mlflow_tracking_uri)
    settings = mlflow_server.model_copy(update={"promotion_min_improvement": 0.01})
    gate_tags = {"gate.candidate_loss": "1.995000", "gate.champion_loss": "2.000000", "gate.champion": "base/model"}
    v1 = register_model_version(name, f"s3://models/{name}/v1", None, tags=gate_tags, settings=settings)

    rejected = decide(cfg, settings, v1.version, None, actor="test")
    assert rejected["promoted"] is False and "is not below 1.9800" in rejected["reason"], rejected
    assert "vs base/model, margin 0.01" in rejected["reason"]
    tags = client.get_model_version(name, v1.version).tags
    assert tags["promotion"] == "rejected" and tags["promotion.by"].startswith("test (")
    assert tags["promotion.from"] == "none"
    assert client.get_registered_model(name).aliases == {}

    v2 = register_model_version(name, f"s3://models/{name}/v2", None, settings=settings)
    with pytest.raises(PromotionError, match="has not been evaluated"):
        decide(cfg, settings, v2.version, 0.0, actor="test")
    client.set_registered_model_alias(name, "champion", v2.version)  # the champion moved after v1's evaluation
    moved = rf"champion changed since the evaluation \(base/model -> models:/{name}/2\)"
    with pytest.raises(PromotionError, match=moved):
        decide(cfg, settings, v1.version, 0.0, actor="test")
    assert decide(cfg, settings, v2.version, 0.0, actor="test")["reason"] == "version 2 already is the champion"


def test_llmops_promote_gate_evaluates_both_on_the_recipes_data_and_keeps_the_champion_it_prefers(
    mlflow_server: Settings, tmp_path
):
    """`llmops promote NAME --version 2 --gate RECIPE`: v2 and the champion v1 (two tiny models in
    S3) are evaluated on the recipe's eval_data, the losses tagged on v2; a margin v2 cannot meet
    keeps v1 (exit 2, the rejection tagged, the alias unmoved)."""
    import yaml
    from conftest import llmops_cli
    from mlflow import MlflowClient
    from tiny_model import build_tiny_chat_model

    from ray_app.registry import register_model_version
    from ray_app.storage import open_store

    name = f"gate-cli-{uuid.uuid4().hex[:6]}"
    settings = mlflow_server.model_copy(update={"store_uri": f"s3://{name}/store"})
    store = open_store(settings=settings)
    store.ensure()
    for seed in (1, 2):
        store.upload_dir(build_tiny_chat_model(tmp_path / f"tiny-{seed}", seed=seed), f"models/{seed}", progress=False)
        register_model_version(name, store.uri(f"models/{seed}"), None, settings=settings)
    client = MlflowClient(settings.mlflow_tracking_uri)
    client.set_registered_model_alias(name, "champion", "1")
    recipe = yaml.safe_load((REPO / "training" / "configs" / "tiny_cpu.yaml").read_text())
    data = REPO / "training" / "data"
    recipe.update(model=str(tmp_path / "tiny-1"), train_data=str(data / "chat_sft.jsonl"),
                  eval_data=str(data / "chat_eval.jsonl"))  # fmt: skip
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))

    llmops = llmops_cli(settings)
    done = llmops("promote", name, "--version", "2", "--gate", str(tmp_path / "recipe.yaml"),
                  "--min-improvement", "0.99", "--no-rollout")  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"{name}: kept champion 1:" in done.stdout and "margin 0.99" in done.stdout, done.stdout
    tags = client.get_model_version(name, "2").tags
    assert tags["gate.champion"] == f"models:/{name}/1" and tags["promotion"] == "rejected", tags
    assert float(tags["gate.candidate_loss"]) > 0 and float(tags["gate.champion_loss"]) > 0
    assert f"eval loss {float(tags['gate.candidate_loss']):.4f}" in done.stdout
    assert client.get_model_version_by_alias(name, "champion").version == "1"

    both = llmops("promote", name, "--version", "2", "--from", "challenger", "--gate", "x.yaml")
    assert both.returncode == 1 and "exactly one of --version V or --from ALIAS" in both.stderr, both.stderr


def test_the_feedback_test_is_exact_for_small_counts():
    from ray_app.promotion import probability_worse

    assert probability_worse(0, 0, 0, 0) == pytest.approx(0.5)  # no evidence: a coin
    assert probability_worse(5, 10, 1, 10) == pytest.approx(0.9683, abs=1e-4)  # Monte Carlo: 0.9684
    assert probability_worse(1, 10, 5, 10) == pytest.approx(1 - 0.9683, abs=1e-4)  # symmetric
    assert probability_worse(30, 100, 20, 100) == pytest.approx(0.9476, abs=1e-4)


def test_the_canary_policy_rolls_back_on_failure_or_worse_feedback_and_promotes_only_after_its_window():
    from ray_app.promotion import CanaryPolicy, VersionSignals, canary_verdict

    policy = CanaryPolicy(window_s=600, min_requests=20, max_error_ratio=0.05, min_ratings=10)
    champion = VersionSignals(requests=400, server_errors=1, ttft_p95_s=0.4, ratings=40, thumbs_down=4)
    good = VersionSignals(requests=50, server_errors=0, ttft_p95_s=0.45, ratings=12, thumbs_down=1)

    def action(canary: VersionSignals, elapsed: float = 700) -> str:
        return canary_verdict(champion, canary, elapsed, policy).action

    assert action(good) == "promote"
    assert action(good, elapsed=100) == "wait"  # too early, nothing wrong
    assert action(VersionSignals(requests=50, server_errors=5, ttft_p95_s=0.4), elapsed=10) == "rollback"
    assert action(VersionSignals(requests=10, server_errors=5, ttft_p95_s=0.4), elapsed=10) == "wait"  # too few
    worse = canary_verdict(champion, VersionSignals(requests=50, ratings=10, thumbs_down=7), 10, policy)
    assert worse.action == "rollback" and "thumbs-down" in worse.reason
    assert float(worse.evidence["p_feedback_worse"]) > 0.95
    slow = canary_verdict(champion, VersionSignals(requests=50, ttft_p95_s=1.5, ratings=12), 10, policy)
    assert slow.action == "rollback" and "TTFT p95 1.50 s above 0.90 s" in slow.reason
    assert action(VersionSignals(requests=50, ttft_p95_s=0.8, ratings=12)) == "promote"  # within the 0.5 s floor
    unrated = canary_verdict(champion, VersionSignals(requests=50, ratings=3), 700, policy)
    assert unrated.action == "rollback" and "3 rating(s), fewer than 10" in unrated.reason
    assert "requests=50 5xx=0" in canary_verdict(champion, good, 700, policy).evidence["canary"]


def test_the_canary_policy_comes_from_settings_latency_allowance_included(monkeypatch, tmp_path):
    from ray_app.promotion import CanaryPolicy, VersionSignals, canary_verdict
    from ray_app.settings import load_settings

    monkeypatch.setenv("LLMOPS_HOME", str(tmp_path))
    for key, value in {"WINDOW_S": "600", "LATENCY_MARGIN": "0.1", "LATENCY_FLOOR_S": "0.05", "MIN_RATINGS": "0",
                       "MIN_REQUESTS": "20"}.items():  # fmt: skip
        monkeypatch.setenv(f"LLMOPS_CANARY_{key}", value)
    strict = CanaryPolicy.from_settings(load_settings())
    assert (strict.window_s, strict.latency_margin, strict.latency_floor_s, strict.min_ratings) == (600, 0.1, 0.05, 0)
    champion = VersionSignals(requests=400, ttft_p95_s=0.4)
    slow = canary_verdict(champion, VersionSignals(requests=50, ttft_p95_s=0.5), 700, strict)
    assert slow.action == "rollback" and "TTFT p95 0.50 s above 0.45 s" in slow.reason  # 0.4 + max(0.04, 0.05)
    assert canary_verdict(champion, VersionSignals(requests=50, ttft_p95_s=0.44), 700, strict).action == "promote"
    monkeypatch.setenv("LLMOPS_CANARY_WINDOW_S", "90000")  # more than a day: the DAG's task could not wait for it
    with pytest.raises(SettingsError, match="canary_window_s"):
        load_settings()


# --- the cases users gave: replayed corrections and the regression set -------------------
def _scores(replay=(0, 0, 0, 0.0, 0.0), regression_cases=0, lost=()):
    from ray_app.promotion import CaseScores

    return CaseScores(
        *replay, regression_cases, len(lost), tuple(lost), 0.5 if lost else 0.0, "s3://b/regression/x/v0001"
    )


@pytest.mark.parametrize(
    ("scores", "policy", "passed", "why"),
    [
        (_scores(), {}, True, "no replayed correction; 0 of 0 regression case(s)"),  # no cases: nothing against it
        (_scores((4, 3, 3, 0.2, 0.2), 5), {}, True,
         "prefers 3 of 4 replayed corrections by +0.200 nats/token (models:/chat/3: 3, +0.200)"),  # a tie passes
        (_scores((4, 2, 3, 0.11, 0.2), 5), {}, True, "prefers 2 of 4"),  # trails by less than the margin
        (_scores((4, 2, 3, 0.09, 0.2), 5), {}, False, "trails models:/chat/3 by more than 0.1 nats/token"),
        (_scores((4, 2, 3, 0.0, 0.2), 5), {"replay_margin": 0.25}, True, "prefers 2 of 4"),
        (_scores((4, 2, 0, 0.5, -1.0), 5), {"min_replay_accuracy": 0.75}, False, ": fewer than 75%"),
        (_scores((4, 3, 0, 0.5, -1.0), 5), {"min_replay_accuracy": 0.75}, True, "prefers 3 of 4"),
        (_scores((0, 0, 0, 0.0, 0.0), 5, ["c1"]), {}, False,
         "1 of 5 regression case(s) less likely by more than 0.1 nats/token (worst 0.500), more than the 0 allowed: "
         "c1"),
        (_scores((0, 0, 0, 0.0, 0.0), 5, ["c1"]), {"max_regressions": 1}, True, "1 of 5 regression case(s)"),
        (None, {}, False, "no replay/regression scores on the candidate: re-run evaluate"),
    ],
)  # fmt: skip
def test_the_case_gate_is_pinned(scores, policy, passed, why):
    from ray_app.promotion import CasePolicy, CaseScores, case_gate

    verdict = case_gate(scores, CasePolicy(**policy), "models:/chat/3")
    assert verdict[0] is passed and why in verdict[1], verdict
    if scores is not None:
        assert CaseScores.from_tags(scores.as_tags()) == scores
    assert CaseScores.from_tags({"gate.candidate_loss": "1.0"}) is None  # evaluated before the cases existed


def _nudged(model_dir: Path, out: Path, conversation: list[dict], completion: str, direction: float) -> Path:
    """A copy of ``model_dir`` trained a few steps to make ``completion`` more (+1) or less (-1) likely."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.scoring import completion_tokens

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids, labels = completion_tokens(conversation, completion, tokenizer, 64)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(8):
        loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss
        (direction * loss).backward()
        optimizer.step()
        optimizer.zero_grad()
    shutil.copytree(model_dir, out)
    model.save_pretrained(out)
    return out


def test_the_gate_replays_approved_corrections_and_rejects_a_candidate_that_makes_one_less_likely(
    mlflow_server: Settings, tmp_path
):
    """Ratings written through Chainlit's data layer; the champion and two candidates in the S3 server:
    one trained away from an approved correction (rejected, with the case named, though its loss
    wins), one trained towards it (promoted). The regression set is stored versioned and only grows."""
    from conftest import write_feedback
    from mlflow import MlflowClient
    from tiny_model import build_tiny_chat_model

    from ray_app.chat.review import APPROVED, ReviewPolicy, candidates
    from ray_app.chat.review import decide as review
    from ray_app.promotion import evaluate
    from ray_app.registry import register_model_version
    from ray_app.regression import latest_regression_set
    from ray_app.storage import open_store
    from training.config import SFTConfig

    name = f"gate-cases-{uuid.uuid4().hex[:6]}"
    chat_db = f"sqlite+aiosqlite:///{tmp_path / 'chat' / 'chat.db'}"
    settings = mlflow_server.model_copy(update={"store_uri": f"s3://{name}/store", "chat_database_url": chat_db})
    write_feedback(chat_db, model_version=f"{name}/1", ratings=[
        ("Who moves the champion alias?", "Nobody.", 0, "correction: The promote step."),
        ("What serves models?", "Ray Serve.", 1, None),
    ])  # fmt: skip
    [fix] = candidates(chat_db, ReviewPolicy(), "pending")
    review(chat_db, fix, APPROVED, "rita")
    question = [{"role": "user", "content": "Who moves the champion alias?"}]
    base = build_tiny_chat_model(tmp_path / "champion", seed=3)
    store = open_store(settings=settings)
    store.ensure()
    models = {"1": base, "2": _nudged(base, tmp_path / "worse", question, "The promote step.", -1.0),
              "3": _nudged(base, tmp_path / "better", question, "The promote step.", +1.0)}  # fmt: skip
    for version, folder in models.items():
        store.upload_dir(folder, f"models/{version}", progress=False)
        register_model_version(name, store.uri(f"models/{version}"), None, settings=settings)
    client = MlflowClient(settings.mlflow_tracking_uri)
    client.set_registered_model_alias(name, "champion", "1")
    cfg = SFTConfig.model_construct(registered_model=name, model=str(base), eval_data=[__file__], seq_len=64,
                                    sample_prompts=[], max_new_tokens=4)  # fmt: skip
    wins = {f"models:/{name}/{v}": 1.0 for v in ("2", "3")} | {f"models:/{name}/1": 2.0}  # the loss gate passes

    worse = evaluate(cfg, settings, "2", known_losses=wins)
    assert (worse.cases.replay_cases, worse.cases.candidate_wins, worse.cases.regression_cases) == (1, 0, 2)
    assert worse.cases.regressions and worse.cases.regressions[0].startswith(fix.feedback_id), worse.cases
    rejected = decide(cfg, settings, "2", 0.0, actor="test", rollout=False)
    assert rejected["promoted"] is False and "eval loss 1.0000 < 2.0000" in rejected["reason"], rejected
    assert "prefers 0 of 1 replayed corrections" in rejected["reason"] or "regression case" in rejected["reason"]
    tags = client.get_model_version(name, "2").tags
    assert tags["promotion"] == "rejected" and tags["gate.replay_cases"] == "1" and tags["gate.regressions"] != "0"
    version, kept = latest_regression_set(name, settings)
    assert version == 1 and tags["gate.regression_set"].endswith(f"regression/{name}/v0001"), tags
    assert sorted(case["completion"] for case in kept) == ["Ray Serve.", "The promote step."]

    # Outside the replay window the correction is still a regression case: rejected for that alone.
    old = settings.model_copy(update={"gate_replay_days": 1e-9})
    evaluate(cfg, old, "2", known_losses=wins)
    alone = decide(cfg, old, "2", 0.0, actor="test", rollout=False)
    assert alone["promoted"] is False and "no replayed correction; " in alone["reason"], alone
    assert "of 2 regression case(s) less likely" in alone["reason"] and fix.feedback_id in alone["reason"]

    write_feedback(chat_db, [("Is Ray fast?", "Yes.", 1, None)], model_version=f"{name}/1")
    better = evaluate(cfg, settings, "3", known_losses=wins)
    assert (better.cases.candidate_wins, better.cases.regressions) == (1, ()), better.cases
    assert latest_regression_set(name, settings)[0] == 2 and better.cases.regression_cases == 3  # it only grew
    promoted = decide(cfg, settings, "3", 0.0, actor="test", rollout=False)
    assert promoted["promoted"] is True and "prefers 1 of 1 replayed corrections" in promoted["reason"], promoted
    assert client.get_model_version_by_alias(name, "champion").version == "3"


def test_a_preference_candidate_may_keep_the_loss_but_must_show_what_it_learned():
    from ray_app.promotion import offline_gate, preference_learned

    kept = offline_gate(2.03, 2.0, 0.01, "models:/chat/3", tolerance=0.02)
    assert kept.promoted and "eval loss 2.0300 <= 2.0400 (vs models:/chat/3, preference candidate, tolerance 0.02)" in (
        kept.reason
    )
    assert not offline_gate(2.05, 2.0, 0.01, tolerance=0.02).promoted
    assert not offline_gate(math.nan, 2.0, 0.01, tolerance=0.02).promoted  # missing evidence still loses
    gained, same = _scores((2, 1, 0, 0.3, -0.2)), _scores((2, 1, 1, 0.1, 0.1))
    assert preference_learned(gained, {}, "v3") == (True, "learned: the replayed corrections gained over v3")
    assert preference_learned(same, {}, "v3")[0] is False  # a tie taught nothing
    accuracy = {"training.base_preference_accuracy": "0.5000", "training.preference_accuracy": "0.9000"}
    assert preference_learned(_scores(), accuracy, "v3") == (True, "learned: held-out preference accuracy 0.50 -> 0.90")
    assert preference_learned(_scores(), {**accuracy, "training.preference_accuracy": "0.5"}, "v3")[0] is False
    assert "needs a held-out preference accuracy" in preference_learned(_scores(), {}, "v3")[1]


def test_a_candidate_that_loses_many_regression_cases_is_counted_whole_though_only_some_are_named():
    from ray_app.promotion import MAX_LOST_IDS, CasePolicy, CaseScores, case_gate

    named = tuple(f"{uuid.uuid4()}:{i:012d}" for i in range(MAX_LOST_IDS))
    scores = CaseScores(regression_cases=300, lost=250, regressions=named, worst_loss=0.7)
    assert CaseScores.from_tags(scores.as_tags()) == scores
    passed, why = case_gate(scores, CasePolicy(max_regressions=240))
    assert not passed and why.startswith("no replayed correction; 250 of 300 regression case(s)"), why
