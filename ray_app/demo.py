"""`llmops demo`: the whole life of the chat model on this machine, one step after another.

Stack up -> evaluate the base model -> fine-tune it on Ray Train + DeepSpeed (2 CPU workers,
live progress) -> evaluate the candidate and promote it to `champion` only if it beats the
current champion (or the base) -> serve it with Ray Serve -> start the chat -> summary.
Each step says what it does; a failing step stops the demo with one line naming the step
and its log.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ray_app import credentials
from ray_app.chat.auth import load_logins
from ray_app.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "training" / "configs" / "smollm2_135m_sft.yaml"
SERVE_CONFIG = ROOT / "serve_configs" / "local.yaml"
FAST_STEPS = 4


class DemoFailed(RuntimeError):
    """A demo step failed; the message names the step and where to look."""


@dataclass
class DemoResult:
    base_loss: float
    candidate_loss: float | None
    champion_loss: float | None
    promoted: bool
    reason: str
    run_id: str
    registered: str | None
    served_model: str


@contextmanager
def step(console: Console, number: int, total: int, what: str, log_hint: str):
    console.print(f"[bold]{number}/{total}[/] {what}")
    started = time.monotonic()
    try:
        yield
    except Exception as exc:  # every failure becomes one line naming the step and its log
        raise DemoFailed(f"step {number} ({what}) failed: {exc.__class__.__name__}: {exc}; log: {log_hint}") from exc
    console.print(f"    done in {time.monotonic() - started:.0f} s")


class TrainingProgress:
    """A live progress bar of steps, loss and tokens/s, read from the run's MLflow metrics."""

    def __init__(self, settings: Settings, experiment: str, run_name: str, total_steps: int, console: Console):
        self.settings, self.experiment, self.run_name, self.total = settings, experiment, run_name, total_steps
        self.progress = Progress(
            TextColumn("    training"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
            TimeElapsedColumn(), console=console,
        )  # fmt: skip
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        from ray_app.registry import client

        mlflow = client(self.settings)
        task = self.progress.add_task("starting workers...", total=self.total)
        run_id = None
        while not self.stop.wait(2.0):
            try:
                if run_id is None:
                    experiment = mlflow.get_experiment_by_name(self.experiment)
                    runs = experiment and mlflow.search_runs(
                        [experiment.experiment_id], filter_string=f"tags.`mlflow.runName` = '{self.run_name}'"
                    )
                    run_id = runs[0].info.run_id if runs else None
                    continue
                losses = mlflow.get_metric_history(run_id, "train_loss")
                speeds = mlflow.get_metric_history(run_id, "tokens_per_s")
            except Exception:  # noqa: S112 - the bar is cosmetic: a failed poll waits for the next one
                continue
            if losses:
                last = max(losses, key=lambda m: m.step)
                speed = f" · {max(speeds, key=lambda m: m.step).value:.0f} tok/s" if speeds else ""
                self.progress.update(task, completed=last.step, description=f"loss {last.value:.3f}{speed}")

    def __enter__(self) -> TrainingProgress:
        self.progress.start()
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        self.progress.stop()


def run_demo(settings: Settings, console: Console, fast: bool = False, model: str | None = None,
             config: Path = DEFAULT_CONFIG) -> DemoResult:  # fmt: skip
    """Run every stage of the demo against the local stack; raises DemoFailed naming the failed step."""
    from ray_app.stack import LocalStack, ray_temp_dir

    total = 8
    settings = settings.model_copy(update={"ray_address": settings.ray_address or settings.ray_gcs_address})
    stack = LocalStack(settings)
    ray_logs = f"{ray_temp_dir(settings)}/session_latest/logs (and the Ray dashboard {settings.ray_dashboard_url})"
    stack_logs = str(settings.stack_dir / "logs")

    with step(console, 1, total, "starting the local stack: Ray head (dashboard, Jobs API) and MLflow", stack_logs):
        stack.up(["ray", "mlflow"], echo=lambda line: console.print(f"    {line}"))
        from ray_app.storage import open_store

        store = open_store(settings=settings)
        store.ensure()
        console.print(f"    store: {store.root_uri}")

    from training.config import load_config

    overrides = {"model": model} if model else {}
    cfg = load_config(config, **overrides)
    if fast:
        cfg = cfg.model_copy(update={"max_steps": min(cfg.max_steps or FAST_STEPS, FAST_STEPS),
                                     "checkpoint_every": FAST_STEPS})  # fmt: skip
    run_name = f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    cfg = cfg.model_copy(update={"run_name": run_name})
    base_ref = cfg.model or "default"

    with step(console, 2, total, f"preparing the base model ({base_ref}) and evaluating it on {cfg.eval_data[0]}",
              stack_logs):  # fmt: skip
        from training.evaluate import evaluate_model

        with console.status("    evaluating the base model..."):
            base = evaluate_model(base_ref, cfg.eval_data, cfg.seq_len, settings, max_new_tokens=cfg.max_new_tokens)
        console.print(f"    base: eval loss {base.loss:.4f}, perplexity {base.perplexity:.1f}")

    with step(console, 3, total, f"fine-tuning with Ray Train + DeepSpeed ({cfg.num_workers} workers, "
              f"{cfg.deepspeed}, {cfg.max_steps} steps), checkpoints to the store, registered in MLflow",
              ray_logs):  # fmt: skip
        result = _train(console, cfg, settings)
        console.print(f"    {cfg.registered_model} version {result.registered_version} (alias challenger), "
                      f"eval loss {result.eval_loss:.4f}")  # fmt: skip

    name = cfg.registered_model or "chat-model"
    margin = settings.promotion_min_improvement
    gating = (f"gating: the candidate replaces `champion` only if its eval loss is {margin:.0%} lower than the "
              "champion's (or the base model's) on the same data")  # fmt: skip
    with step(console, 4, total, gating, settings.mlflow_server_url):
        promoted, reason, reference, champion = _gate(console, cfg, settings, result, {base_ref: base.loss})
    served = f"models:/{name}@champion" if promoted or champion is not None else base_ref

    with step(console, 5, total, f"serving {served} with Ray Serve ({SERVE_CONFIG.relative_to(ROOT)})", ray_logs):
        from ray_app.serving.rollout import deploy, load_serve_config

        with console.status("    deploying (each replica loads the model)..."):
            deploy(load_serve_config(SERVE_CONFIG, settings, model=served), settings, wait_s=600)

    with step(console, 6, total, "asking the served model a question through the OpenAI API", ray_logs):
        from openai import OpenAI

        api = OpenAI(base_url=f"{settings.serve_url}/v1", api_key=credentials.serve_api_keys(settings)[0], timeout=120)
        served_name = api.models.list().data[0].id
        reply = api.chat.completions.create(
            model=served_name,
            max_tokens=cfg.max_new_tokens,
            temperature=0,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
        )
        console.print(f"    Q: What is the capital of France?  A ({reply.system_fingerprint}): "
                      f"{reply.choices[0].message.content.strip()[:200]}")  # fmt: skip

    with step(console, 7, total, "starting the Chainlit chat", stack_logs):
        stack.up(["chat"], echo=lambda line: console.print(f"    {line}"))

    with step(console, 8, total, "summary", stack_logs):
        outcome = f"{'promoted' if promoted else 'not promoted'}: {reason}"
        console.print(_summary(settings, result, base.loss, outcome))
    return DemoResult(base_loss=base.loss, candidate_loss=result.eval_loss, champion_loss=reference,
                      promoted=promoted, reason=reason, run_id=result.mlflow_run_id,
                      registered=result.registered_version, served_model=served)  # fmt: skip


def _train(console: Console, cfg, settings: Settings):
    """The recipe on the stack's Ray head, with a live progress bar (Ray's own logging kept quiet)."""
    import logging

    import ray

    from training.sft import run

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # the bar says enough; Ray's log has the rest
    if not ray.is_initialized():
        credentials.apply_ray_client_env(settings)
        credentials.export_to_this_process(settings)
        env = settings.worker_env() | {"DS_ACCELERATOR": "cuda" if cfg.use_gpu else "cpu"}
        ray.init(address=settings.ray_address, runtime_env={"env_vars": env}, log_to_driver=False,
                 logging_level=logging.WARNING)  # fmt: skip
    with TrainingProgress(settings, cfg.experiment, cfg.run_name, cfg.max_steps or 0, console):
        return run(cfg, settings)


def _gate(console: Console, cfg, settings: Settings, result, known: dict[str, float]):
    """The demo's gate (ray_app.promotion, the DAG's too): (promoted, reason, reference loss, champion version).

    ``known``: losses already measured on ``cfg.eval_data`` (the base model's); the candidate's
    eval loss from its run is one too, so only an existing champion is evaluated here.
    """
    from ray_app import promotion

    name = cfg.registered_model or "chat-model"
    if result.eval_loss is not None:
        known = {**known, f"models:/{name}/{result.registered_version}": result.eval_loss}
    evaluation = promotion.evaluate(cfg, settings, result.registered_version, known_losses=known)
    margin = settings.promotion_min_improvement
    decision = promotion.decide(cfg, settings, result.registered_version, margin, actor="llmops demo")
    against = f"champion v{evaluation.champion_version}" if evaluation.champion_version else "the base model"
    if decision["promoted"]:
        console.print(f"    promoted v{result.registered_version} to champion over {against}: {decision['reason']}")
    else:
        console.print(f"    kept {against}: {decision['reason']}")
    return decision["promoted"], decision["reason"], evaluation.reference_loss, evaluation.champion_version


def _summary(settings: Settings, result, base_loss: float, outcome: str) -> str:
    """The demo's last words: where everything is and how to log in."""
    from ray_app.registry import client

    experiment_id = client(settings).get_run(result.mlflow_run_id).info.experiment_id
    run_url = f"{settings.mlflow_server_url}/#/experiments/{experiment_id}/runs/{result.mlflow_run_id}"
    login = ", ".join(load_logins(settings).users)
    password = "" if settings.chat_users else f" (password in {settings.chat_admin_password_path})"
    where = "MLFLOW_TRACKING_PASSWORD" if settings.mlflow_tracking_password else settings.mlflow_admin_password_path
    mlflow_login = f"login {credentials.mlflow_identity(settings)[0]}, password in {where}"
    candidate = f"{result.eval_loss:.4f}" if result.eval_loss is not None else "n/a"
    return f"""
    eval loss   base {base_loss:.4f} -> candidate {candidate} ({outcome})
    chat        {settings.chat_url}  login: {login}{password}
    Serve API   {settings.serve_url}/v1  (key in LLMOPS_API_KEYS or {settings.serve_api_key_path})
    MLflow run  {run_url}  ({mlflow_login})
    Ray         {settings.ray_dashboard_url}  (token: `.venv/bin/llmops token ray`)
    stop it all with: .venv/bin/llmops down"""
