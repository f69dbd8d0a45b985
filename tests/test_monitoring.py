"""Monitoring without services: the alert rules under `promtool test rules`, the generated Prometheus
config under `promtool check config`, and every metric the rules name is one the platform exports.

The live checks (real Prometheus scraping a real Serve app and chat) are in test_serving.py and
test_chat.py, beside the apps they scrape."""

from __future__ import annotations

import re
import stat
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import load_script

from ray_app import monitoring
from ray_app.chat.metrics import EXPORTED as CHAT_METRICS
from ray_app.orchestration.loop_metrics import EXPORTED as LOOP_METRICS
from ray_app.serving.metrics import EXPORTED as SERVING_METRICS
from ray_app.settings import load_settings
from training.metrics import EXPORTED as TRAINING_METRICS

REPO = Path(__file__).resolve().parents[1]
RULES = REPO / "cluster" / "prometheus" / "alerts.yml"
# Ray Serve's own metrics the rules use (the live test checks Prometheus holds them).
RAY_SERVE_METRICS = {"ray_serve_deployment_replica_starts_total"}
PROMQL_FUNCTIONS_AND_WORDS = {
    "sum", "max", "min", "by", "on", "and", "or", "rate", "increase", "time", "histogram_quantile", "group_left",
    "le", "without", "unless", "ignoring", "avg", "count", "offset",
}  # fmt: skip


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_alert_rules_pass_promtool_check_and_their_unit_tests():
    checked = promtool("check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = promtool("test", "rules", "alerts_test.yml", cwd=RULES.parent)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout
    alerts = {rule["alert"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]
              if "alert" in rule}  # fmt: skip
    unit_tested = set(re.findall(r"alertname: (\w+)", (RULES.parent / "alerts_test.yml").read_text()))
    assert alerts == unit_tested, f"alerts without a unit test: {alerts - unit_tested}"


def exported_names() -> set[str]:
    names = {*SERVING_METRICS, *TRAINING_METRICS, *CHAT_METRICS, *LOOP_METRICS, *RAY_SERVE_METRICS}
    histograms = {name for name in names if name.endswith("_s") or name.endswith("_seconds")}
    return names | {f"{name}{suffix}" for name in histograms for suffix in ("_bucket", "_count", "_sum")}


def metric_names(expr: str) -> set[str]:
    """Identifiers of a PromQL expression that are metric names (not functions, keywords or labels)."""
    without_strings = re.sub(r'"[^"]*"', "", expr)
    without_labels = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", without_strings)  # matchers and ranges
    without_groupings = re.sub(r"\b(by|on|without|ignoring|group_left|group_right)\s*\([^)]*\)", "", without_labels)
    without_groupings = re.sub(r"\b\d+(ms|[smhdwy])\b", "", without_groupings)  # offset 1d
    words = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", without_groupings))
    return words - PROMQL_FUNCTIONS_AND_WORDS


def test_every_metric_the_rules_name_is_exported_by_the_platform_or_recorded():
    rules = [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]
    recorded = {rule["record"] for rule in rules if "record" in rule}
    known = exported_names() | recorded
    for rule in rules:
        unknown = metric_names(rule["expr"]) - known
        assert not unknown, f"{rule.get('alert') or rule.get('record')} names {unknown}, which nothing exports"


def test_metric_names_sees_the_metrics_of_an_expression():
    names = metric_names('sum by (model_version) (rate(ray_llmops_requests_total{code=~"5.."}[5m])) / up')
    assert names == {"ray_llmops_requests_total", "up"}


@pytest.fixture()
def generated(tmp_path: Path) -> tuple[Path, Path, object]:
    settings = load_settings(home=tmp_path / "home", prometheus_port=19090, mlflow_serve_password="serve-pw-123")
    assert settings.mlflow_auth
    config, web = monitoring.write_config(settings, tmp_path / "ray" / "prom_metrics_service_discovery.json")
    return config, web, settings


def test_the_generated_config_passes_promtool_and_holds_no_secret(generated):
    config, web, settings = generated
    checked = promtool("check", "config", str(config))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    web_checked = promtool("check", "web-config", str(web))
    assert web_checked.returncode == 0, web_checked.stdout + web_checked.stderr
    text = config.read_text()
    for secret in (monitoring.prometheus_password(settings), monitoring.metrics_token(settings), "serve-pw-123"):
        assert secret not in text and secret not in web.read_text()
        assert secret not in " ".join(monitoring.prometheus_command(settings))
    for path in config.parent.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    jobs = {job["job_name"]: job for job in yaml.safe_load(text)["scrape_configs"]}
    # MLflow's basic-auth app shows /metrics to admins only: Prometheus gets no admin password.
    assert set(jobs) == {"ray", "chat", "prometheus"}
    assert jobs["chat"]["authorization"]["credentials_file"] == str(monitoring.metrics_token_path(settings))
    assert "--web.listen-address=127.0.0.1:19090" in monitoring.prometheus_command(settings)


def test_mlflow_is_scraped_when_it_runs_without_its_auth_app(tmp_path: Path):
    settings = load_settings(home=tmp_path / "home", mlflow_auth=False, mlflow_port=5123)
    config, _web = monitoring.write_config(settings, tmp_path / "sd.json")
    jobs = {job["job_name"]: job for job in yaml.safe_load(config.read_text())["scrape_configs"]}
    assert jobs["mlflow"]["static_configs"] == [{"targets": ["127.0.0.1:5123"]}]
    assert not {"basic_auth", "authorization"} & set(jobs["mlflow"])


def test_the_ray_dashboard_is_told_where_prometheus_is_and_how_to_log_in(generated):
    import base64
    import json

    _config, _web, settings = generated
    env = monitoring.dashboard_env(settings)
    assert env["RAY_PROMETHEUS_HOST"] == "http://127.0.0.1:19090"
    basic = json.loads(env["RAY_PROMETHEUS_HEADERS"])["Authorization"].removeprefix("Basic ")
    assert base64.b64decode(basic).decode() == f"llmops:{monitoring.prometheus_password(settings)}"
    assert "RAY_GRAFANA_HOST" not in env


def dashboard_queries() -> list[str]:
    module = load_script(REPO / "cluster" / "grafana" / "build_dashboards.py")
    assert module.main(["--check"]) == 0, "cluster/grafana/dashboards/ is stale: run build_dashboards.py"
    return module.queries()


def test_every_dashboard_query_parses_in_prometheus_and_names_only_exported_metrics(prometheus):
    rules = [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]
    known = exported_names() | {rule["record"] for rule in rules if "record" in rule}
    exprs = dashboard_queries()
    assert len(exprs) >= 20
    for expr in exprs:
        concrete = expr.replace("$model_version", ".*").replace("$__rate_interval", "1m")
        monitoring.query(prometheus, concrete)  # a query Prometheus cannot parse raises MonitoringError (400)
        unknown = metric_names(concrete) - known
        assert not unknown, f"{expr} names {unknown}, which nothing exports"
    with pytest.raises(monitoring.MonitoringError, match="parse error"):
        monitoring.query(prometheus, "sum by (model_version (ray_llmops_queue_length)")
