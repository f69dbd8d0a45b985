"""Preference fine-tuning (training/dpo.py): the objectives on their own, the data, and DPO and KTO
runs on 2 CPU workers of a real Ray head under ZeRO-2, checkpointing into the S3 server and
tracking into the MLflow server, with a tiny model built from a config."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
from conftest import logged_steps
from tiny_model import build_tiny_chat_model

from training.config import ConfigError, load_config
from training.dpo import PreferenceConfig

# Each topic has its answer; a pair prefers the topic's answer over another topic's. Every answer
# is as often chosen as rejected, so a model that ignores the question is right half the time.
ANSWERS = {"fruit": "apple", "colour": "blue", "animal": "horse", "metal": "iron"}


def preference_pairs(numbers: range) -> list[dict]:
    pairs = []
    for number in numbers:
        for topic, answer in ANSWERS.items():
            for other in ANSWERS.values():
                if other != answer:
                    question = f"Question {number}: name a {topic}."
                    pairs.append({"messages": [{"role": "user", "content": question}], "chosen": answer,
                                  "rejected": other, "model_version": "tiny-pref/1"})  # fmt: skip
    random.Random(len(pairs)).shuffle(pairs)
    return pairs


# The same answers opened warmly or curtly: a style users prefer whatever the question. LoRA on the
# random tiny model learns it in a few steps; the topic pairs above, which need the question routed
# to its answer, it does not learn (measured: rank 16, attention or all linear layers, lr 1e-2..1e-1).
WARM = ("Sure", "Certainly", "Happy", "Great", "Hello", "Thanks")  # one token each, as are the curt ones
CURT = ("No", "Whatever", "Fine", "Ok", "Look", "Obviously")


def style_pairs(numbers: range) -> list[dict]:
    rng, pairs = random.Random(numbers.start), []
    for number in numbers:
        for topic, answer in ANSWERS.items():
            question = [{"role": "user", "content": f"Question {number}: name a {topic}."}]
            for warm, curt in zip(rng.sample(WARM, len(WARM)), rng.sample(CURT, len(CURT)), strict=True):
                pairs.append({"messages": question, "chosen": f"{warm}, {answer}.", "rejected": f"{curt}, {answer}.",
                              "model_version": "tiny-pref/1"})  # fmt: skip
    rng.shuffle(pairs)
    return pairs


def thumbs_of(pairs: list[dict]) -> list[dict]:
    """Each pair's two answers as unpaired thumbs: the chosen one up, the rejected one down."""
    return [{"messages": pair["messages"], "completion": pair[side], "desirable": side == "chosen"}
            for pair in pairs for side in ("chosen", "rejected")]  # fmt: skip


def write_jsonl(path: Path, records: list[dict], extra_lines: tuple[str, ...] = ()) -> Path:
    path.write_text("\n".join([*(json.dumps(record) for record in records), *extra_lines]) + "\n")
    return path


# --- the objectives and the data, without Ray --------------------------------------------
def test_dpo_loss_is_log2_at_the_reference_and_falls_as_the_chosen_answer_gains():
    import torch

    from training.dpo import dpo_loss

    same = torch.tensor([-5.0, -7.0])
    loss, metrics = dpo_loss(same, same - 1, same, same - 1, beta=0.1)
    assert float(loss) == pytest.approx(math.log(2)) and metrics["reward_accuracy"] == 0.0
    assert metrics["reward_margin"] == 0.0
    chosen = torch.tensor([-5.0, -7.0], requires_grad=True)
    rejected = torch.tensor([-6.0, -8.0], requires_grad=True)
    loss, metrics = dpo_loss(chosen, rejected, same, same - 1, beta=0.5)
    loss.backward()
    assert float(loss) == pytest.approx(math.log(2))  # both moved alike: no preference learned
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()  # descent raises chosen, lowers rejected
    better, metrics = dpo_loss(same + 2, same - 1, same, same - 1, beta=0.5)
    assert float(better) < math.log(2) and metrics["reward_accuracy"] == 1.0
    assert metrics["reward_margin"] == pytest.approx(1.0) and metrics["chosen_reward"] == pytest.approx(1.0)


def test_kto_loss_pushes_desirable_answers_up_and_undesirable_ones_down():
    import torch

    from training.dpo import kto_loss

    logps = torch.tensor([-4.0, -4.0, -6.0, -6.0], requires_grad=True)
    reference = torch.tensor([-4.0, -4.0, -6.0, -6.0])
    desirable = torch.tensor([1, 1, 0, 0])
    loss, metrics = kto_loss(logps, reference, desirable, beta=0.1, desirable_weight=1.0, undesirable_weight=2.0)
    loss.backward()
    assert float(loss) == pytest.approx((2 * 0.5 + 2 * 2 * 0.5) / 4)  # at the reference: 1 - sigmoid(0)
    assert (logps.grad[:2] < 0).all() and (logps.grad[2:] > 0).all()
    assert metrics["kl"] == 0.0 and metrics["chosen_logp"] == -4.0 and metrics["rejected_logp"] == -6.0


def test_sequence_log_probs_count_only_the_labelled_tokens():
    import torch

    from training.data import IGNORE_INDEX
    from training.scoring import sequence_logps

    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 4, IGNORE_INDEX], [IGNORE_INDEX, 1, 2, 3, 4]])
    expected = [
        float(torch.log_softmax(logits[row], -1)[position - 1, labels[row, position]])
        for row in range(2)
        for position in range(1, 5)
        if labels[row, position] != IGNORE_INDEX
    ]
    got = sequence_logps(logits, labels)
    assert float(got[0]) == pytest.approx(sum(expected[:2]), rel=1e-5)
    assert float(got[1]) == pytest.approx(sum(expected[2:]), rel=1e-5)


def test_only_the_completion_is_scored_and_a_long_prompt_loses_its_oldest_tokens(tmp_path):
    from transformers import AutoTokenizer

    from training.data import IGNORE_INDEX
    from training.scoring import completion_tokens

    tokenizer = AutoTokenizer.from_pretrained(build_tiny_chat_model(tmp_path / "tiny", hidden=32, layers=1))
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fruit."}]
    ids, labels = completion_tokens(prompt, "apple", tokenizer, seq_len=64)
    scored = [label for label in labels if label != IGNORE_INDEX]
    assert tokenizer.decode(scored).startswith("apple") and len(ids) == len(labels)
    assert labels[: len(ids) - len(scored)] == [IGNORE_INDEX] * (len(ids) - len(scored))
    long_prompt = [{"role": "user", "content": "word " * 200}]
    ids, labels = completion_tokens(long_prompt, "apple", tokenizer, seq_len=32)
    assert len(ids) == 32 and tokenizer.decode([t for t in labels if t != IGNORE_INDEX]).startswith("apple")


def test_left_padded_completion_scores_equal_each_sequence_scored_alone(tmp_path):
    """The training batch (left-padded, logits of the completion only) scores every completion as the
    whole sequence scored alone does."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.dpo import tokenize_preferences
    from training.scoring import completion_logps, completion_tokens, sequence_logps

    folder = build_tiny_chat_model(tmp_path / "tiny", hidden=32, layers=1)
    pairs = preference_pairs(range(2))[:3]
    pairs[0]["messages"].insert(0, {"role": "system", "content": "A much longer system prompt than the others."})
    rows = tokenize_preferences({"text": np.asarray([json.dumps(pair) for pair in pairs])}, str(folder), 48, "dpo")
    assert list(rows["error"]) == ["", "", ""] and (rows["chosen_mask"][:, -1] == 1).all()
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids, mask, labels = (torch.as_tensor(rows[f"chosen_{part}"]) for part in ("ids", "mask", "labels"))
    with torch.no_grad():
        batched = completion_logps(model, ids, mask, labels)
        for index, pair in enumerate(pairs):
            ids, labels = completion_tokens(pair["messages"], pair["chosen"], tokenizer, 48)
            alone = sequence_logps(model(input_ids=torch.tensor([ids])).logits, torch.tensor([labels]))
            assert float(batched[index]) == pytest.approx(float(alone[0]), abs=1e-4)


def test_a_records_weight_scales_its_share_of_the_loss():
    import torch

    from training.dpo import dpo_loss, kto_loss, parse_preference

    chosen, rejected, reference = torch.tensor([-5.0, -3.0]), torch.tensor([-6.0, -9.0]), torch.tensor([-6.0, -6.0])
    each = [
        float(dpo_loss(chosen[i : i + 1], rejected[i : i + 1], reference[:1], reference[:1], 0.5)[0]) for i in (0, 1)
    ]
    weighted, _ = dpo_loss(chosen, rejected, reference, reference, 0.5, weights=torch.tensor([1.0, 0.25]))
    assert float(weighted) == pytest.approx((each[0] + 0.25 * each[1]) / 2)
    unweighted, _ = kto_loss(chosen, reference, torch.tensor([1, 0]), 0.5)
    assert float(kto_loss(chosen, reference, torch.tensor([1, 0]), 0.5, weights=torch.ones(2))[0]) == pytest.approx(
        float(unweighted)
    )
    question = [{"role": "user", "content": "Name a fruit."}]
    assert parse_preference(json.dumps({"messages": question, "chosen": "a", "rejected": "b"}), "dpo")["weight"] == 1
    record = {"messages": question, "chosen": "a", "rejected": "b", "weight": 0.5, "model_version": ["m/1"]}
    assert parse_preference(json.dumps(record), "dpo")["weight"] == 0.5
    for bad in (0, -1, "1", True, 1000):
        with pytest.raises(ValueError, match="'weight' must be a number"):
            parse_preference(json.dumps({**record, "weight": bad}), "dpo")


def _rating(number: int, value: int, answer: str, comment=None, version="m/2", question="Name a fruit.", review=None):
    from ray_app.chat.feedback import FeedbackRecord

    return FeedbackRecord(
        feedback_id=f"f{number}", thread_id=f"t{number}", step_id=f"s{number}", value=value, comment=comment,
        model_version=version, answer=answer, answered_at=f"2026-12-01T00:00:{number:02d}Z", user="alice",
        conversation=[{"role": "user", "content": question}], review=review,
    )  # fmt: skip


def test_chat_ratings_become_pairs_and_thumbs_weighed_by_the_version_that_answered():
    from ray_app.chat.feedback import Review
    from ray_app.chat.preferences import preference_data
    from ray_app.chat.review import APPROVED, ReviewPolicy, digest

    ratings = [
        _rating(1, 1, "apple"), _rating(2, 0, "stone"), _rating(3, 0, "rock", version="m/1"),  # one prompt
        _rating(4, 0, "blue", "correction: red", question="Name a colour."),  # waits for a reviewer
        _rating(5, 0, "iron", "correction: horse", question="Name an animal."),
        _rating(6, 1, "apple"),  # the same answer as 1: no pair against it from itself
    ]  # fmt: skip
    approved = ratings[4]
    ratings[4] = _rating(5, 0, "iron", "correction: horse", question="Name an animal.",
                         review=Review(APPROVED, "rita", "2026-12-01T01:00:00Z", digest(approved)))  # fmt: skip
    data = preference_data(ratings, ReviewPolicy(), current_version="m/2", other_version_weight=0.5)
    pairs = {(p["chosen"], p["rejected"], p["source"], p["weight"]) for p in data.pairs}
    assert pairs == {("horse", "iron", "correction", 1.0), ("apple", "stone", "thumbs", 1.0),
                     ("apple", "rock", "thumbs", 0.5)}, data.pairs  # fmt: skip
    assert len(data.pairs) == 5  # both thumbs-up answers against each thumbs-down one
    assert [p["model_version"] for p in data.pairs if p["rejected"] == "rock"] == [["m/1", "m/2"]] * 2
    thumbs = sorted((t["completion"], t["desirable"], t["weight"]) for t in data.thumbs)
    assert thumbs == [("apple", True, 1.0), ("apple", True, 1.0), ("horse", True, 1.0), ("iron", False, 1.0),
                      ("rock", False, 0.5), ("stone", False, 1.0)]  # fmt: skip
    horse = next(p for p in data.pairs if p["chosen"] == "horse")
    assert horse["ready_at"] == "2026-12-01T01:00:00Z" and horse["feedback_ids"] == ["f5"]  # approved later
    assert data.new_since("2026-12-01T00:00:30Z").counts()["pairs"] == 1

    dropped = preference_data(ratings, ReviewPolicy(), current_version="m/2", other_version_weight=0.0)
    assert {p["rejected"] for p in dropped.pairs} == {"iron", "stone"} and dropped.dropped == 3
    strict = preference_data(ratings, ReviewPolicy(review_thumbs_down=True), "m/2", 1.0)  # thumbs-down wait too
    assert {(p["chosen"], p["rejected"]) for p in strict.pairs} == {("horse", "iron")}
    assert all(t["desirable"] or t["completion"] == "iron" for t in strict.thumbs)
    assert preference_data(ratings, ReviewPolicy(), None, 0.0).dropped == 0  # no champion: every example counts


def test_the_reference_scorer_runs_in_the_trainings_precision_on_a_gpu_or_the_cpu():
    from training.dpo import scorer_options

    gpu = load_config(None, [], schema=PreferenceConfig, train_data=[__file__], use_gpu=True, precision="bf16")
    options = scorer_options(gpu, "/models/m")
    assert options["num_gpus"] == 1 and "num_cpus" not in options
    wanted = {"model_dir": "/models/m", "sides": ("chosen", "rejected"), "device": "cuda", "precision": "bf16",
              "cpu_autocast": False}  # fmt: skip
    assert options["fn_constructor_kwargs"] == wanted
    kto = load_config(None, [], schema=PreferenceConfig, train_data=[__file__], objective="kto", precision="bf16")
    cpu = scorer_options(kto, "m")
    assert cpu["num_cpus"] == 1 and cpu["fn_constructor_kwargs"]["device"] == "cpu"
    assert cpu["fn_constructor_kwargs"]["sides"] == ("completion",)
    # bf16 on CPU: fp32 weights under autocast, as the policy runs
    assert cpu["fn_constructor_kwargs"]["precision"] == "fp32" and cpu["fn_constructor_kwargs"]["cpu_autocast"]
    auto = load_config(None, [], schema=PreferenceConfig, train_data=[__file__])  # precision: auto
    assert scorer_options(auto, "m")["fn_constructor_kwargs"]["cpu_autocast"] is None, "the actor's own CPU decides"


def test_bad_preference_records_and_configs_are_named():
    from training.dpo import parse_preference

    def error(record: object, objective: str = "dpo") -> str:
        with pytest.raises(ValueError) as caught:
            parse_preference(json.dumps(record), objective)
        return str(caught.value)

    question = [{"role": "user", "content": "Name a fruit."}]
    assert "'rejected' must be a non-empty string" in error({"messages": question, "chosen": "apple"})
    assert "the same text" in error({"messages": question, "chosen": "apple", "rejected": "apple"})
    assert "end with the user's turn" in error({"messages": [*question, {"role": "assistant", "content": "x"}],
                                                "chosen": "a", "rejected": "b"})  # fmt: skip
    assert "'desirable' must be true or false" in error({"messages": question, "completion": "apple"}, "kto")
    assert "non-empty 'messages'" in error({"chosen": "a", "rejected": "b"})
    with pytest.raises(ConfigError, match="objective"):
        load_config(None, [], schema=PreferenceConfig, train_data=[__file__], objective="ppo")
    with pytest.raises(ConfigError, match="pack: preference examples are scored whole"):
        load_config(None, [], schema=PreferenceConfig, train_data=[__file__], pack=True)
    with pytest.raises(ConfigError, match="beta"):
        load_config(None, [], schema=PreferenceConfig, train_data=[__file__], beta=0)


# --- DPO and KTO on Ray Train + DeepSpeed ------------------------------------------------
BETA = 0.5


def preference_config(model: Path, data: Path, **values) -> PreferenceConfig:
    base = dict(model=str(model), train_data=[str(data)], num_workers=2, deepspeed="zero2.json", method="full",
                max_steps=40, learning_rate=5e-3, beta=BETA, lr_schedule="cosine", warmup_steps=0, seq_len=32,
                micro_batch_size=4, checkpoint_every=20, experiment="tests-preference",
                registered_model="tiny-pref", precision="fp32")  # fmt: skip
    return load_config(None, [], schema=PreferenceConfig, **{**base, **values})


def metric_history(settings, run_id: str, name: str) -> list[float]:
    from mlflow import MlflowClient

    history = MlflowClient(settings.mlflow_tracking_uri).get_metric_history(run_id, name)
    return [point.value for point in sorted(history, key=lambda point: point.step)]


def mean(values: list[float]) -> float:
    """The mean of the finite values (a KTO step whose batches held no disliked answer logs NaN for them)."""
    finite = [value for value in values if math.isfinite(value)]
    return sum(finite) / len(finite)


def test_full_dpo_on_two_workers_learns_which_answer_users_prefer_and_registers_a_challenger(cluster, tmp_path):
    """Full fine-tuning under ZeRO-2: the reference log-probs come from Ray Data batch inference
    before training; a worker SIGKILLed after the step-20 checkpoint: the run resumes from it;
    held-out preference accuracy goes from a coin toss to >= 90%, the reward margin grows, every
    step is logged once, the result is registered as challenger."""
    import os
    import signal
    import time

    from conftest import after_a_checkpoint
    from mlflow import MlflowClient

    from ray_app.registry import get_version
    from ray_app.storage import open_store
    from training.dpo import run

    model = build_tiny_chat_model(tmp_path / "tiny", hidden=128, layers=2)
    broken = ("{not json", json.dumps({"messages": [{"role": "user", "content": "hi"}], "chosen": "a"}))
    train = write_jsonl(tmp_path / "pairs.jsonl", preference_pairs(range(10)), broken)
    held = write_jsonl(tmp_path / "held.jsonl", preference_pairs(range(100, 104)))
    run_name, killed = f"dpo-kill-{int(time.time())}", {}

    def kill_a_worker(step: int, workers: list) -> bool:
        if len(workers) < 2 or killed:
            return False
        killed.update(step=step, pid=workers[0].pid)
        os.kill(workers[0].pid, signal.SIGKILL)
        return True

    store = open_store(settings=cluster)
    store.ensure()
    # From step 26, once Ray Train's controller registered the step-20 checkpoint (after_a_checkpoint).
    watcher = after_a_checkpoint(cluster, store, "tests-preference", run_name, 26, kill_a_worker)
    # 50 steps: at 40 one run of many ended at 0.896 (the steps replayed after the kill see other batches).
    values = {"eval_data": [str(held)], "run_name": run_name, "max_failures": 1, "max_steps": 50}
    result = run(preference_config(model, train, **values), cluster)
    watcher.join(timeout=5)

    assert 26 <= killed.get("step", 0) < 40, f"no kill between the step-20 and step-40 checkpoints: {killed}"
    client = MlflowClient(cluster.mlflow_tracking_uri)
    resumed = [point.value for point in client.get_metric_history(result.mlflow_run_id, "resumed_from_step")]
    assert resumed == [20], (resumed, killed, logged_steps(cluster, result.mlflow_run_id))
    assert logged_steps(cluster, result.mlflow_run_id) == list(range(1, 51)), "every step logged once"

    margins = metric_history(cluster, result.mlflow_run_id, "reward_margin")
    accuracy = metric_history(cluster, result.mlflow_run_id, "reward_accuracy")
    assert result.data["records"] == 120 and result.data["skipped"] == 2, result.data
    assert 0.3 <= result.base_preference_accuracy <= 0.7, result.base_preference_accuracy
    assert result.preference_accuracy >= 0.9, (result, margins, accuracy)
    assert result.global_step == 50
    assert len(margins) == 50 and mean(margins[-5:]) > mean(margins[:5]) + 1.0, margins
    assert mean(accuracy[-5:]) >= 0.75 > mean(accuracy[:5]), accuracy  # per micro-batch of 4: noisy
    logged = MlflowClient(cluster.mlflow_tracking_uri).get_run(result.mlflow_run_id).data
    assert {"chosen_logp", "rejected_logp", "chosen_reward", "tokens_per_s", "grad_norm"} <= set(logged.metrics)
    assert logged.params["objective"] == "dpo" and logged.params["data.records"] == "120"
    version = get_version("models:/tiny-pref@challenger", cluster)
    assert version.version == result.registered_version and version.source == result.model_uri
    assert version.tags["training.objective"] == "dpo"
    saved = [info.key for info in open_store(settings=cluster).list(f"checkpoints/{result.run_name}")]
    assert any(key.endswith("trainer_state.json") for key in saved), saved


def test_kto_on_unpaired_thumbs_learns_which_answers_are_liked(cluster, tmp_path):
    """Unpaired thumbs (KTO, full fine-tuning): liked answers gain reward over disliked ones and the
    held-out pairs' preference accuracy rises above a coin toss. Each question's liked answer is
    rated three times, each disliked one once; desirable_weight 3 (measured here: with 1, 40 steps
    learned nothing, with 3 the held-out accuracy passed 0.8 within 60)."""
    from training.dpo import run

    model = build_tiny_chat_model(tmp_path / "tiny", hidden=128, layers=2)
    thumbs = thumbs_of(preference_pairs(range(10)))
    data = write_jsonl(tmp_path / "thumbs.jsonl", thumbs)
    held = write_jsonl(tmp_path / "held.jsonl", preference_pairs(range(100, 104)))
    values = {"objective": "kto", "desirable_weight": 3.0, "max_steps": 60, "checkpoint_every": 60,
              "registered_model": None, "eval_data": [str(held)]}  # fmt: skip
    result = run(preference_config(model, data, **values), cluster)

    assert result.data["records"] == len(thumbs) and result.global_step == 60
    liked = metric_history(cluster, result.mlflow_run_id, "chosen_reward")
    disliked = metric_history(cluster, result.mlflow_run_id, "rejected_reward")
    gap = [good - bad for good, bad in zip(liked, disliked, strict=True)]
    assert mean(gap[-10:]) > mean(gap[:10]) + 0.2, (liked, disliked)
    # KTO's signal is weaker than DPO's and its runs vary (Ray Data splits blocks between the workers):
    # held-out accuracies of 0.67 to 0.9 were seen from 0.52. Better than the base by 5 of 48 pairs.
    assert result.preference_accuracy > result.base_preference_accuracy + 0.1, result


@pytest.mark.parametrize("objective", ["dpo", "kto"])
def test_lora_learns_the_answer_style_users_prefer_with_its_adapters_off_as_reference(cluster, tmp_path, objective):
    """LoRA needs no reference copy: at the first step the policy (zero-initialised adapters) and the
    reference (adapters off) give the same log-probs, so DPO's margin is 0 and its loss log 2 (KTO's
    rewards 0). The adapters learn the warm openings users prefer: held-out questions go from a coin
    toss to >= 90%; liked answers end above the reference and disliked ones below it (KTO's reference
    point is its KL estimate: the batch's mean log-ratio). KTO's folder has the adapters merged; DPO's is
    published unmerged as an adapter of the registered base, its lineage on that version, and measured
    (the held-out accuracy) as the base with the adapter."""
    from ray_app.models import resolve_model
    from training.dpo import run

    model = build_tiny_chat_model(tmp_path / "tiny", hidden=128, layers=2)
    lora = {"rank": 16, "alpha": 32, "dropout": 0.0}
    base, registered = model, None
    if objective == "dpo":
        base, registered = _registered(cluster, model, "tiny-pref-lora"), "tiny-pref-lora"
        lora["save"] = "adapter"
    pairs = style_pairs(range(6))
    if objective == "dpo":
        data = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    else:
        data = write_jsonl(tmp_path / "thumbs.jsonl", thumbs_of(pairs))
    held = write_jsonl(tmp_path / "held.jsonl", style_pairs(range(100, 104)))
    steps = 16 if objective == "dpo" else 32
    values = {"objective": objective, "method": "lora", "learning_rate": 1e-2, "max_steps": steps,
              "checkpoint_every": steps, "registered_model": registered, "eval_data": [str(held)],
              "lora": lora}  # fmt: skip
    result = run(preference_config(base, data, **values), cluster)

    liked = metric_history(cluster, result.mlflow_run_id, "chosen_reward")
    disliked = metric_history(cluster, result.mlflow_run_id, "rejected_reward")
    assert {value for value in (liked[0], disliked[0]) if math.isfinite(value)} == {0.0}, (liked, disliked)
    if objective == "dpo":
        losses = metric_history(cluster, result.mlflow_run_id, "train_loss")
        assert losses[0] == pytest.approx(math.log(2), abs=1e-6), losses
    assert 0.3 <= result.base_preference_accuracy <= 0.7, result.base_preference_accuracy
    assert result.preference_accuracy >= 0.9, (result, liked, disliked)
    if objective == "dpo":  # rewards are beta times the log-ratio to the reference
        assert mean(liked[-4:]) > 0.1 and mean(disliked[-4:]) < -0.1, (liked, disliked)
    else:  # KTO's reference point is the batch's mean log-ratio (kl): liked answers end above it, disliked below
        kl = metric_history(cluster, result.mlflow_run_id, "kl")[-8:]
        liked_ratio, disliked_ratio = mean(liked[-8:]) / BETA, mean(disliked[-8:]) / BETA
        assert liked_ratio > 0 and disliked_ratio + 0.2 < mean(kl) < liked_ratio - 0.2, (liked, disliked, kl)
    liked_logp = metric_history(cluster, result.mlflow_run_id, "chosen_logp")
    disliked_logp = metric_history(cluster, result.mlflow_run_id, "rejected_logp")
    assert mean(liked_logp[-4:]) - mean(disliked_logp[-4:]) > mean(liked_logp[:2]) - mean(disliked_logp[:2]) + 0.5
    if objective == "kto":
        folder = resolve_model(result.model_uri, cluster)
        assert (folder / "model.safetensors").is_file() and not list(folder.glob("adapter_*"))
        return
    from mlflow import MlflowClient

    from ray_app.adapters import fetch_adapter, lineage_tag

    assert result.registered_version is None and result.adapter == result.run_name, result
    folder = fetch_adapter("tiny-pref-lora", "1", result.adapter, cluster)
    assert (folder / "adapter_model.safetensors").is_file() and not (folder / "model.safetensors").exists()
    tags = MlflowClient(cluster.mlflow_tracking_uri).get_model_version("tiny-pref-lora", "1").tags
    lineage = json.loads(tags[lineage_tag(result.adapter)])
    assert lineage["training.objective"] == "dpo" and lineage["run_id"] == result.mlflow_run_id, lineage
    assert float(lineage["training.preference_accuracy"]) == pytest.approx(result.preference_accuracy, abs=1e-4)


def _registered(settings, folder: Path, name: str) -> str:
    """``folder`` uploaded to the store and registered as version 1 of ``name`` (champion): its reference."""
    from ray_app.registry import register_model_version
    from ray_app.storage import open_store

    store = open_store(settings=settings)
    store.ensure()
    store.upload_dir(folder, f"tests-preference/{name}", progress=False)
    source = store.uri(f"tests-preference/{name}")
    register_model_version(name, source, run_id=None, alias="champion", settings=settings)
    return f"models:/{name}@champion"
