"""The `llmops` command line: the local stack, settings, the store and model resolution.

Errors a user can cause (a bad setting, a taken port, an unreachable endpoint) print one
red line and exit 1; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from ray_app.adapters import SEPARATOR
from ray_app.settings import Settings, SettingsError, load_settings

app = typer.Typer(
    name="llmops",
    help="ray-llmops: fine-tune, track, store and serve chat models on Ray.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
store_app = typer.Typer(help="Inspect and move directories in the checkpoint/model store.", no_args_is_help=True)
app.add_typer(store_app, name="store")
feedback_app = typer.Typer(help="Chat feedback that may become training data.", no_args_is_help=True)
app.add_typer(feedback_app, name="feedback")

console = Console()
err_console = Console(stderr=True)
_state: dict[str, object] = {"debug": False, "overrides": {}}

F = TypeVar("F", bound=Callable[..., object])


def _user_errors() -> tuple[type[BaseException], ...]:
    from ray_app.chat.review import ReviewError
    from ray_app.demo import DemoFailed
    from ray_app.models import ModelResolutionError
    from ray_app.monitoring import MonitoringError
    from ray_app.promotion import PromotionError
    from ray_app.registry import RegistryError
    from ray_app.serving.rollout import ServeError
    from ray_app.stack import StackError
    from ray_app.storage import StoreError

    return (
        SettingsError,
        StackError,
        MonitoringError,
        StoreError,
        ModelResolutionError,
        RegistryError,
        PromotionError,
        ServeError,
        DemoFailed,
        ReviewError,
        ValueError,
        FileNotFoundError,
    )


def friendly_errors(func: F) -> F:
    """Turn a user-caused exception into one red line and exit code 1."""

    @wraps(func)
    def wrapper(*args: object, **kwargs: object) -> object:
        try:
            return func(*args, **kwargs)
        except _user_errors() as exc:
            if _state["debug"]:
                raise
            err_console.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def settings() -> Settings:
    """The settings with the global CLI overrides applied."""
    return load_settings(**_state["overrides"])  # type: ignore[arg-type]


@app.callback()
def main(
    home: Annotated[Path | None, typer.Option(help="state dir (LLMOPS_HOME)")] = None,
    store: Annotated[
        str | None, typer.Option(help="store URI, s3://bucket/prefix or a path (LLMOPS_STORE_URI)")
    ] = None,
    debug: Annotated[bool, typer.Option(help="show tracebacks")] = False,
) -> None:
    """ray-llmops: fine-tune, track, store and serve chat models on Ray."""
    _state["debug"] = debug
    _state["overrides"] = {"home": home, "store_uri": store}


def _status_table(rows: list) -> Table:
    table = Table(title="ray-llmops local stack")
    for column in ("service", "state", "url", "pid", "log"):
        table.add_column(column)
    for row in rows:
        colour = "green" if row.healthy else ("yellow" if row.running else "red")
        table.add_row(row.name, f"[{colour}]{row.state}[/]", row.url, str(row.pid or "-"), row.log or "-")
    return table


@app.command()
@friendly_errors
def up(
    service: Annotated[
        list[str] | None,
        typer.Option("--service", "-s", help="only these (ray, mlflow; chat, airflow, prometheus on request)"),
    ] = None,
) -> None:
    """Start the local stack (Ray head with dashboard + Jobs API, MLflow server); harmless if running."""
    from ray_app.stack import SERVICES, SPECS, LocalStack

    names = service or list(SERVICES)
    unknown = [name for name in names if name not in SPECS]
    if unknown:
        raise ValueError(f"unknown service {unknown[0]!r}; expected one of {', '.join(SPECS)}")
    rows = LocalStack(settings()).up(names, echo=console.print)
    console.print(_status_table(rows))


@app.command()
@friendly_errors
def down() -> None:
    """Stop what `llmops up` started, by PID; nothing else."""
    from ray_app.stack import LocalStack

    LocalStack(settings()).down(echo=console.print)


@app.command()
@friendly_errors
def status() -> None:
    """Show each service, its URL and whether it answers its health check."""
    from ray_app.stack import LocalStack

    current = settings()
    rows = LocalStack(current).status()
    console.print(_status_table(rows))
    for line in login_hints(current, {row.name for row in rows}):
        console.print(line, highlight=False, soft_wrap=True)
    if any(row.name == "ray" and row.healthy for row in rows):
        from ray_app.serving.rollout import ServeError, canary_lines

        try:
            for line in canary_lines(current):
                console.print(line, highlight=False, soft_wrap=True)
        except ServeError as exc:  # Serve not started, or an app deployed from Python: nothing to say
            console.print(f"Serve: {exc}", highlight=False, soft_wrap=True)
    if not all(row.healthy for row in rows):
        raise typer.Exit(3)


def login_hints(current: Settings, services: set[str]) -> list[str]:
    """How to log in to the pages `status` lists (the secrets stay in their files)."""
    hints = []
    if current.ray_auth_mode == "token":
        hints.append(f"Ray dashboard asks for a token: `llmops token ray` prints it ({current.ray_auth_token_path}; "
                     "`ray get-auth-token` reads ~/.ray, not this stack)")  # fmt: skip
    if "prometheus" in services:
        hints.append("Prometheus: user llmops, password from `llmops token prometheus`")
    return hints


TOKENS = ("ray", "api", "prometheus")


@app.command()
@friendly_errors
def token(name: Annotated[str, typer.Argument(help=f"one of {', '.join(TOKENS)}")]) -> None:
    """Print a secret of the local stack (Ray dashboard token, inference API key, Prometheus password)."""
    from ray_app import credentials, monitoring

    current = settings()
    if name not in TOKENS:
        raise ValueError(f"unknown token {name!r}; expected one of {', '.join(TOKENS)}")
    if name == "ray":
        credentials.ensure_ray_token(current)
        value = credentials.ray_auth_headers(current).get("Authorization", "").removeprefix("Bearer ")
        if not value:
            raise ValueError("Ray token authentication is off here (ray_auth_mode=disabled)")
    elif name == "api":
        value = credentials.serve_api_keys(current)[0]
    else:
        value = monitoring.prometheus_password(current)
    print(value)


@app.command()
@friendly_errors
def config() -> None:
    """Print the effective settings (secrets masked)."""
    table = Table(title="settings")
    table.add_column("name")
    table.add_column("value")
    for name, value in settings().redacted().items():
        table.add_row(name, value)
    console.print(table)


@app.command("resolve-model")
@friendly_errors
def resolve_model_cmd(
    ref: Annotated[str | None, typer.Argument(help="default, a folder, s3://bucket/key or a hub id")] = None,
) -> None:
    """Resolve a model reference to a local Hugging Face folder (converting/downloading once)."""
    from ray_app.models import resolve_model

    console.print(str(resolve_model(ref, settings())), highlight=False, soft_wrap=True)


@store_app.command("ls")
@friendly_errors
def store_ls(prefix: Annotated[str, typer.Argument()] = "") -> None:
    """List files under a prefix of the store."""
    from ray_app.storage import open_store

    for info in open_store(settings=settings()).list(prefix):
        console.print(f"{info.size:>12}  {info.key}", highlight=False)


@store_app.command("put")
@friendly_errors
def store_put(local_dir: Path, prefix: str) -> None:
    """Upload a directory to PREFIX (checksummed manifest written last)."""
    from ray_app.storage import open_store

    store = open_store(settings=settings())
    store.ensure()
    manifest = store.upload_dir(local_dir, prefix)
    console.print(f"uploaded {len(manifest)} files to {store.uri(prefix)}")


@store_app.command("get")
@friendly_errors
def store_get(prefix: str, local_dir: Path) -> None:
    """Download PREFIX to a local directory, verifying every checksum."""
    from ray_app.storage import open_store

    path = open_store(settings=settings()).download_dir(prefix, local_dir)
    console.print(f"downloaded to {path}")


@store_app.command("rm")
@friendly_errors
def store_rm(
    prefix: str,
    force: Annotated[
        bool, typer.Option("--force", help="delete even a folder a registered model version points to")
    ] = False,
) -> None:
    """Delete every file under PREFIX; refused for a folder a registered model version points to."""
    from ray_app.registry import versions_using
    from ray_app.storage import open_store

    config = settings()
    store = open_store(settings=config)
    if not force:
        used = versions_using(store.uri(prefix), config)
        if used:
            names = ", ".join(f"{ref.name} v{ref.version}" for ref in used[:5])
            raise ValueError(
                f"{store.uri(prefix)} is the source of registered model version(s) {names}; deleting it would "
                "break serving and rollback to them. Delete the version(s) in MLflow first, or pass --force."
            )
    count = store.delete_prefix(prefix)
    console.print(f"deleted {count} files")


@app.command()
@friendly_errors
def train(
    config_file: Annotated[Path, typer.Option("--config", "-c", help="YAML recipe config")],
    overrides: Annotated[list[str] | None, typer.Option("--set", help="KEY=VALUE override (repeatable)")] = None,
) -> None:
    """Fine-tune with Ray Train + DeepSpeed; register the result as the `challenger`."""
    from dataclasses import asdict

    from training.config import load_config
    from training.sft import run

    cfg = load_config(config_file, overrides or [])
    result = run(cfg, settings())
    table = Table(title="training run")
    table.add_column("field")
    table.add_column("value")
    for key, value in asdict(result).items():
        table.add_row(key, str(value))
    console.print(table)


@app.command()
@friendly_errors
def register(run_id: Annotated[str, typer.Argument(help="the MLflow run id of a finished training run")]) -> None:
    """Register a trained run whose registration failed (MLflow or S3 down at its end): one version, alias `challenger`.

    Idempotent: a run that already has its version gets it completed (tags, alias), never a second one.
    """
    from training.sft import register_run

    version = register_run(run_id, settings())
    if isinstance(version, str):  # a LoRA adapter, recorded on its base version
        console.print(f"adapter {version} (served as model {version!r}) from run {run_id}")
        return
    console.print(f"{version.name}: version {version.version} (challenger) from run {run_id}, source {version.source}")


@app.command()
@friendly_errors
def tune(
    config_file: Annotated[Path, typer.Option("--config", "-c", help="YAML recipe config")],
    search: Annotated[list[str], typer.Option("--search", help="KEY=fn(args): loguniform/uniform/randint/choice/grid")],
    samples: Annotated[int, typer.Option(help="trials to sample")] = 4,
    overrides: Annotated[list[str] | None, typer.Option("--set", help="KEY=VALUE override (repeatable)")] = None,
) -> None:
    """Sweep the recipe with Ray Tune (ASHA); each trial an MLflow child run; print the best config."""
    from training.config import load_config
    from training.tune import sweep

    result = sweep(load_config(config_file, overrides or []), search, samples, settings())
    console.print(f"best train_loss {result.best_loss:.4f} with {result.best_config} "
                  f"({result.trials} trials, {result.stopped_early} stopped early; MLflow parent run "
                  f"{result.parent_run_id})")  # fmt: skip


@app.command("eval")
@friendly_errors
def eval_cmd(
    model: Annotated[str | None, typer.Argument(help="model reference (default: the base model)")] = None,
    data: Annotated[list[str] | None, typer.Option("--data", help="eval jsonl (repeatable)")] = None,
    seq_len: Annotated[int, typer.Option(help="max tokens per example")] = 512,
) -> None:
    """Held-out loss, perplexity and greedy samples of a model on an eval set."""
    from training.config import REPO_ROOT
    from training.evaluate import evaluate_model

    uris = data or [str(REPO_ROOT / "training" / "data" / "chat_eval.jsonl")]
    report = evaluate_model(model, uris, seq_len, settings())
    console.print(f"model {report.model}: loss {report.loss:.4f}, perplexity {report.perplexity:.2f} "
                  f"over {report.tokens} tokens in {report.examples} examples")  # fmt: skip
    for sample in report.samples:
        console.print(f"  Q: {sample['prompt']}\n  A: {sample['answer']}", highlight=False)


@app.command()
@friendly_errors
def serve(
    config_path: Annotated[Path, typer.Option("--config", help="Serve config YAML")] = Path("serve_configs/local.yaml"),
    model: Annotated[
        str | None, typer.Option(help="models:/NAME@ALIAS, s3://..., a folder, a hub id or 'default'")
    ] = None,
    shutdown: Annotated[bool, typer.Option("--shutdown", help="delete the Serve apps instead")] = False,
    wait: Annotated[float, typer.Option(help="seconds to wait for RUNNING")] = 600.0,
) -> None:
    """Deploy a Serve config to the running Ray cluster (like `serve deploy`), wait until it answers."""
    from ray_app.serving import rollout

    current = settings()
    if shutdown:
        rollout.shutdown(current)
        console.print("Serve applications deleted")
        return
    serve_config = rollout.load_serve_config(config_path, current, model=model)
    with console.status(f"deploying {config_path} (loading the model in each replica)..."):
        rollout.deploy(serve_config, current, wait_s=wait)
    console.print(f"OpenAI API   {current.serve_url}/v1  (key: LLMOPS_API_KEYS or {current.serve_api_key_path})")


@app.command()
@friendly_errors
def promote(
    name: Annotated[str, typer.Argument(help="registered model name, or NAME:ALIAS with --adapter")],
    version: Annotated[str | None, typer.Option(help="the version to promote")] = None,
    from_alias: Annotated[str | None, typer.Option("--from", help="promote what this alias points to")] = None,
    rollout_serve: Annotated[bool, typer.Option("--rollout/--no-rollout", help="roll Serve onto it")] = True,
    gate: Annotated[
        Path | None,
        typer.Option(
            "--gate",
            help="recipe YAML: evaluate the version and the champion (an adapter and the alias's) on its "
            "eval_data first and promote only if it wins (exit 2 when the champion is kept)",
        ),
    ] = None,
    min_improvement: Annotated[
        float | None, typer.Option(help="with --gate: the margin (default: promotion_min_improvement)")
    ] = None,
    canary: Annotated[
        float | None,
        typer.Option(
            help="serve the version beside the champion for this PERCENT of conversations instead (the alias stays)",
            min=0.1,
            max=99.9,
        ),
    ] = None,
    adapter: Annotated[
        str | None, typer.Option(help="NAME:ALIAS: the stored LoRA adapter of the champion to answer as ALIAS")
    ] = None,
) -> None:
    """Roll the Serve apps that serve models:/NAME@champion onto a version, then move the `champion` alias.

    Atomic: if the new replicas do not become healthy, Serve is rolled back and the alias stays.
    With --gate, the offline gate (ray_app.promotion, the demo's and the DAG's) decides first.
    `llmops promote NAME:ALIAS --adapter ADAPTER` does the same for the adapter answering NAME:ALIAS.
    """
    from ray_app.serving.rollout import promote as promote_version

    if SEPARATOR in name or adapter is not None:
        if version or from_alias or SEPARATOR not in name or adapter is None:
            raise ValueError("an adapter alias is promoted as `llmops promote NAME:ALIAS --adapter ADAPTER "
                             "[--gate RECIPE] [--canary PERCENT]` (no --version or --from)")  # fmt: skip
        share = None if canary is None else canary / 100
        if gate is not None:
            _promote_adapter_through_the_gate(name, adapter, gate, min_improvement, share, settings())
            return
        _promote_adapter(name, adapter, share, settings())
        return
    if (version is None) == (from_alias is None):
        raise ValueError("give exactly one of --version V or --from ALIAS")
    current = settings()
    if canary is not None:
        _start_canary(name, version, from_alias, canary / 100, current)
        return
    if gate is not None:
        _promote_through_the_gate(name, version, from_alias, gate, min_improvement, rollout_serve, current)
        return
    with console.status("moving champion and rolling Serve replicas..."):
        result = promote_version(name, current, version=version, from_alias=from_alias, rollout=rollout_serve,
                                 actor="llmops promote")  # fmt: skip
    console.print(f"{name}: champion {result.previous or '(none)'} -> {result.version}")
    _print_rolled(name, result.version, result.rolled_apps, rollout_serve)


def _promote_through_the_gate(name: str, version: str | None, from_alias: str | None, recipe: Path,
                              margin: float | None, rollout_serve: bool, current: Settings) -> None:  # fmt: skip
    from ray_app import promotion
    from ray_app.registry import get_version
    from training.config import load_config

    cfg = load_config(recipe).model_copy(update={"registered_model": name})
    version = version or get_version(f"models:/{name}@{from_alias}", current).version
    with console.status(f"evaluating {name} v{version} and its reference on {', '.join(cfg.eval_data)}..."):
        evaluation = promotion.evaluate(cfg, current, version)
    console.print(f"{name} v{version}: eval loss {evaluation.candidate_loss:.4f}; {evaluation.reference}: "
                  f"{evaluation.reference_loss:.4f}")  # fmt: skip
    with console.status("deciding (and, if it wins, rolling Serve before moving champion)..."):
        decision = promotion.decide(cfg, current, version, margin, actor="llmops promote --gate", rollout=rollout_serve)
    if not decision["promoted"]:
        console.print(f"{name}: kept champion {decision['previous'] or '(none)'}: {decision['reason']}")
        raise typer.Exit(2)
    console.print(f"{name}: champion {decision['previous'] or '(none)'} -> {version}: {decision['reason']}")
    _print_rolled(name, version, decision.get("rolled_apps", []), rollout_serve)


def _start_canary(name: str, version: str | None, from_alias: str | None, share: float, current: Settings) -> None:
    from ray_app.serving.rollout import start_canary

    with console.status("starting the canary's replicas beside the champion's..."):
        canary = start_canary(name, current, version=version, from_alias=from_alias, share=share,
                              actor="llmops promote --canary")  # fmt: skip
    ends = f"`llmops promote {name} --version {canary.version}` or `llmops rollback {name}` ends it"
    where = f"beside champion {canary.champion} in {', '.join(canary.apps)}"
    console.print(f"{name}: version {canary.version} answers {canary.share:.0%} of conversations (sticky by "
                  f"{canary.sticky_by}) {where}; {ends}")  # fmt: skip


def _promote_adapter(model: str, adapter: str, share: float | None, current: Settings) -> None:
    from ray_app.serving.adapter_rollout import promote_adapter, start_adapter_canary

    name, alias = model.split(SEPARATOR, 1)
    if share is None:
        with console.status(f"pinning {model} to {adapter} in the Serve apps..."):
            done = promote_adapter(name, alias, adapter, current, actor="llmops promote")
        console.print(f"{model}: {done.previous or '(none)'} -> {adapter} (adapter of {name}/{done.version})")
        console.print(f"Serve apps rolled: {', '.join(done.apps)}" if done.apps else
                      f"no running Serve app serves models:/{name}@champion with adapters; recorded only")  # fmt: skip
        return
    with console.status(f"starting {adapter} as a canary of {model}..."):
        done = start_adapter_canary(name, alias, adapter, current, share=share, actor="llmops promote --canary")
    console.print(f"{model}: {adapter} answers {share:.0%} of conversations beside {done.previous} in "
                  f"{', '.join(done.apps)}; `llmops judge {model}`, `llmops promote {model} --adapter {adapter}` "
                  f"or `llmops rollback {model}` ends it")  # fmt: skip


def _promote_adapter_through_the_gate(
    model: str, adapter: str, recipe: Path, margin: float | None, share: float | None, current: Settings
) -> None:
    from ray_app import promotion
    from training.config import load_config

    name, alias = model.split(SEPARATOR, 1)
    cfg = load_config(recipe)
    with console.status(f"evaluating {adapter} and what {model} answers with now on {', '.join(cfg.eval_data)}..."):
        decision = promotion.gate_adapter(cfg, current, name, alias, adapter, margin, actor="llmops promote --gate",
                                          canary_share=share or 0.0)  # fmt: skip
    was = decision["previous"] or "(none)"
    if decision.get("canary"):
        console.print(f"{model}: {adapter} passed the gate and answers {share:.0%} of conversations beside {was}; "
                      f"`llmops judge {model}` decides: {decision['reason']}")  # fmt: skip
        return
    if not decision["promoted"]:
        console.print(f"{model}: kept {was}: {decision['reason']}")
        raise typer.Exit(2)
    console.print(f"{model}: {was} -> {adapter} (adapter of {name}/{decision['version']}): {decision['reason']}")


@app.command()
@friendly_errors
def rollback(
    name: Annotated[str, typer.Argument(help="registered model name, or NAME:ALIAS for an adapter's canary")],
    reason: Annotated[str, typer.Option(help="recorded on the canary's version")] = "rolled back by hand",
) -> None:
    """End a canary: the apps serving models:/NAME@champion serve the champion alone again (the alias never moved)."""
    from ray_app.serving.adapter_rollout import stop_adapter_canary
    from ray_app.serving.rollout import stop_canary

    if SEPARATOR in name:
        model, alias = name.split(SEPARATOR, 1)
        apps = stop_adapter_canary(model, alias, settings(), reason, actor="llmops rollback")
        console.print(f"{name}: canary removed from {', '.join(apps)}" if apps else f"{name}: no canary is running")
        return
    with console.status("removing the canary's replicas..."):
        apps = stop_canary(name, settings(), reason, actor="llmops rollback")
    console.print(f"{name}: canary removed from {', '.join(apps)}" if apps else f"{name}: no canary is running")


@app.command()
@friendly_errors
def judge(
    name: Annotated[str, typer.Argument(help="registered model name, or NAME:ALIAS for an adapter's canary")],
    every: Annotated[
        float | None, typer.Option(help="judge again every SECONDS until the canary is promoted or rolled back")
    ] = None,
) -> None:
    """Judge the running canary on its live signals and chat feedback: promote it, roll it back, or wait.

    The policy (ray_app.promotion: error ratio, TTFT p95, thumbs-down rate by an exact Bayesian
    test; window and thresholds from the canary_* settings) and the evidence are tagged on the version.
    """
    import time

    from ray_app.promotion import judge_adapter_canary, judge_canary

    while True:
        if SEPARATOR in name:
            model, alias = name.split(SEPARATOR, 1)
            verdict = judge_adapter_canary(model, alias, settings(), actor="llmops judge")
        else:
            verdict = judge_canary(name, settings(), actor="llmops judge")
        console.print(f"{name}: {verdict.action}: {verdict.reason}")
        for key, value in verdict.evidence.items():
            console.print(f"    {key}: {value}")
        if verdict.action != "wait" or every is None:
            return
        time.sleep(every)


def _print_rolled(name: str, version: str, rolled_apps: list[str], rollout_serve: bool) -> None:
    if rolled_apps:
        console.print(f"Serve apps rolled to version {version}: {', '.join(rolled_apps)}")
    elif rollout_serve:
        console.print(f"no running Serve app serves models:/{name}@champion; nothing to roll")


@app.command()
@friendly_errors
def chat(
    port: Annotated[int | None, typer.Option(help="default LLMOPS_CHAT_PORT (8800)")] = None,
    upgrade_db: Annotated[bool, typer.Option("--upgrade-db", help="only create/upgrade the chat schema")] = False,
) -> None:
    """Run the Chainlit chat (foreground) against the Serve app; history and feedback in SQL."""
    import subprocess

    from ray_app.chat.auth import load_logins
    from ray_app.chat.schema import upgrade_schema
    from ray_app.chat.server import chainlit_command

    current = settings()
    if upgrade_db:  # otherwise the chat app upgrades the schema itself when it starts
        console.print("\n".join(upgrade_schema(str(current.chat_database_url))) or "chat schema is current")
        return
    argv, env = chainlit_command(current, port)
    users = ", ".join(load_logins(current).users)
    console.print(f"chat on http://{current.bind_host}:{port or current.chat_port} (users: {users}), "
                  f"answers from {current.chat_serve_url}")  # fmt: skip
    if not current.chat_users:
        console.print(f"password of `admin`: {current.chat_admin_password_path}")
    raise typer.Exit(subprocess.call(argv, env=env, cwd=current.home / "chat"))


@app.command("mlflow-users")
@friendly_errors
def mlflow_users() -> None:
    """Create or re-key Serve's read-only MLflow user, as the admin (`llmops up` does it for the local stack)."""
    from ray_app.registry import ensure_read_only_user

    current = settings()
    user = ensure_read_only_user(current)
    console.print(f"MLflow user {user} at {current.mlflow_tracking_uri}: read-only (default permission READ)")


@app.command("chat-passwd")
@friendly_errors
def chat_passwd(user: Annotated[str, typer.Argument(help="login name")]) -> None:
    """Print a LLMOPS_CHAT_USERS entry (user:pbkdf2 hash) for a password read from the terminal."""
    from ray_app.chat.auth import hash_password

    password = typer.prompt("password", hide_input=True, confirmation_prompt=True)
    console.print(f"{user}:{hash_password(password)}", highlight=False, soft_wrap=True)


def _show_candidate(record, state: str) -> None:
    from ray_app.chat.review import correction

    console.rule(f"{record.feedback_id}  [{state}]", style="dim")
    console.print(f"by {record.user or '?'} at {record.answered_at}, answered by {record.model_version or '?'}",
                  highlight=False)  # fmt: skip
    for message in record.conversation[-6:]:
        console.print(f"  {message['role']}: {message['content']}", highlight=False, markup=False)
    console.print(f"  assistant (rated {'up' if record.value else 'down'}): {record.answer}", highlight=False,
                  markup=False)  # fmt: skip
    corrected = correction(record)
    if corrected is not None:
        console.print(f"  correction, would train as the answer: {corrected}", highlight=False, markup=False)
    elif not record.value:
        console.print("  preference training would learn to avoid this answer", highlight=False)
    if record.review:
        console.print(f"  {record.review.decision} by {record.review.reviewer} at {record.review.decided_at}",
                      highlight=False)  # fmt: skip


@feedback_app.command("review")
@friendly_errors
def feedback_review(
    approve: Annotated[list[str] | None, typer.Option("--approve", help="feedback id (or 6+ char prefix)")] = None,
    reject: Annotated[list[str] | None, typer.Option("--reject", help="feedback id (or 6+ char prefix)")] = None,
    reviewer: Annotated[str | None, typer.Option(help="who decides (default: your login name)")] = None,
    note: Annotated[str | None, typer.Option(help="kept with the decision")] = None,
    interactive: Annotated[bool, typer.Option("--interactive", "-i", help="ask about each pending item")] = False,
    show_all: Annotated[bool, typer.Option("--all", help="list every candidate with its state")] = False,
) -> None:
    """List the corrections (and ratings) waiting for review; approve or reject them before they train.

    Thumbs-up and thumbs-down ratings wait too when feedback_review_thumbs_up / _down are set.
    """
    import getpass

    from ray_app.chat.review import APPROVED, PENDING, REJECTED, ReviewPolicy, candidates, decide, find

    current = settings()
    url, policy = str(current.chat_database_url), ReviewPolicy.from_settings(current)
    who = reviewer or getpass.getuser()
    records = candidates(url, policy)
    chosen = [(find(records, key), APPROVED) for key in approve or []] + [
        (find(records, key), REJECTED) for key in reject or []
    ]
    for record, decision in chosen:  # every id resolved before anything is written
        decide(url, record, decision, who, note)
        console.print(f"{decision} {record.feedback_id} ({record.user}) as {who}", highlight=False)
    if chosen:
        return
    shown = [record for record in records if show_all or policy.state(record) == PENDING]
    for record in shown:
        _show_candidate(record, policy.state(record))
        if interactive and policy.state(record) == PENDING:
            answer = typer.prompt("approve, reject or skip? [a/r/s]", default="s").strip().lower()[:1]
            if answer in ("a", "r"):
                decision = APPROVED if answer == "a" else REJECTED
                decide(url, record, decision, who, note)
                console.print(f"{decision} as {who}")
    counts = policy.counts(candidates(url, policy))  # as they stand now
    console.print(", ".join(f"{count} {state}" for state, count in counts.items()), highlight=False)


@app.command()
@friendly_errors
def demo(
    fast: Annotated[bool, typer.Option("--fast", help="train a few steps only, for a quick look")] = False,
    model: Annotated[str | None, typer.Option(help="base model reference (default: SmolLM2-135M-Instruct)")] = None,
    config_file: Annotated[Path | None, typer.Option("--config", help="training config")] = None,
) -> None:
    """The main job: stack up, evaluate, fine-tune, gate + promote, serve, chat, summary."""
    from ray_app.demo import DEFAULT_CONFIG, run_demo

    console.rule("[bold]ray-llmops demo")
    run_demo(settings(), console, fast=fast, model=model, config=config_file or DEFAULT_CONFIG)


if __name__ == "__main__":
    app()
