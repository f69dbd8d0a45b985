"""cluster/ validated offline: compose against the Compose spec, KubeRay manifests against the
CRD schemas, the `ray up` file against Ray's schema, and names cross-checked with the settings."""

from __future__ import annotations

import gzip
import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

from ray_app.settings import Settings

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
COMPOSE = yaml.safe_load((CLUSTER / "docker-compose.yml").read_text())
ENV_EXAMPLE = dict(
    line.split("=", 1) for line in (CLUSTER / ".env.example").read_text().splitlines() if line and line[0] != "#"
)
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
# Variables the third-party images read themselves (PostgreSQL, MinIO, Airflow), not our settings.
FOREIGN_IMAGE_ENV = re.compile(
    r"^(POSTGRES_|MINIO_|AIRFLOW_|AIRFLOW__|_PIP_|MLFLOW_DB_|CHAT_DB_|LLMOPS_BUCKET|MLFLOW_BUCKET"
    r"|(TRAINING|MLFLOW|SERVE)_S3_|MLFLOW_BACKEND_STORE_URI$|LLMOPS_REQUIRED_SECRETS$|CHECKPOINT_SIGNING_KEY$"
    r"|MLFLOW_AUTH_|MLFLOW_FLASK_SERVER_SECRET_KEY$|RAY_PROMETHEUS_|RAY_GRAFANA_|GF_)"
)


def settings_env_names() -> set[str]:
    """Every environment variable Settings reads: its aliases, else LLMOPS_<FIELD>."""
    names = set()
    for name, info in Settings.model_fields.items():
        aliases = getattr(info.validation_alias, "choices", None)
        names.update(aliases or [f"LLMOPS_{name.upper()}"])
        names.add(f"LLMOPS_{name.upper()}")
    return names


def test_compose_file_matches_the_compose_specification():
    schema = json.loads((SCHEMAS / "compose-spec.json").read_text())
    errors = [error.message for error in jsonschema.Draft7Validator(schema).iter_errors(COMPOSE)]
    assert errors == []


def test_compose_has_every_service_with_healthchecks_and_profiles():
    services = COMPOSE["services"]
    expected = {
        "postgres", "minio", "minio-init", "mlflow", "ray-head", "ray-gpu-worker", "serve", "chat",
        "airflow-init", "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer",
        "prometheus", "grafana",
    }  # fmt: skip
    assert expected <= set(services)
    one_shots = {name for name, service in services.items() if service.get("restart") == "no"}
    assert one_shots == {"preflight", "minio-init", "mlflow-init", "serve", "airflow-init"}
    for name, service in services.items():
        if name not in one_shots:
            assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    assert services["ray-gpu-worker"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert "airflow" in services["airflow-scheduler"]["profiles"] and "gpu" in services["ray-gpu-worker"]["profiles"]
    init = (CLUSTER / "postgres-init" / "01-databases.sh").read_text()
    assert "for service in mlflow airflow chat" in init
    subprocess.run(["bash", "-n", str(CLUSTER / "postgres-init" / "01-databases.sh")], check=True)


def test_every_compose_variable_is_in_env_example_and_nothing_secret_is_committed():
    text = (CLUSTER / "docker-compose.yml").read_text()
    used = set(re.findall(r"\$\{([A-Z0-9_]+)", text))
    assert used - set(ENV_EXAMPLE) == set()
    unused = {key for key in ENV_EXAMPLE if key not in used and key not in settings_env_names()}
    assert unused == set()
    for key, value in ENV_EXAMPLE.items():
        if re.search(r"PASSWORD|SECRET|TOKEN|API_KEYS|USERS", key) and key != "WANDB_API_KEY":
            assert "change-me" in value, f"{key} in .env.example must be a placeholder"
    assert re.search(r"^\.env$", (REPO / ".gitignore").read_text(), re.M)  # cluster/.env is never committed


def test_platform_env_vars_in_manifests_are_settings_the_code_reads():
    known = settings_env_names()
    services = COMPOSE["services"]
    compose_env = dict(COMPOSE["x-llmops"]["environment"]) | COMPOSE["x-ray-node-env"]
    for name in ("chat", "mlflow", "serve"):
        compose_env |= services[name]["environment"]
    configmap = yaml.safe_load((CLUSTER / "kuberay" / "config.yaml").read_text())["data"]
    secret_keys = re.findall(
        r"\b([A-Z][A-Z0-9_]+)\b", (CLUSTER / "kuberay" / "config.yaml").read_text().split("data:")[0]
    )
    names = {*compose_env, *configmap, *(k for k in secret_keys if k.isupper() and "_" in k)}
    foreign = {name for name in names if FOREIGN_IMAGE_ENV.match(name)}
    assert names - foreign - known == set()


def test_images_and_ports_agree_with_the_project_and_the_settings():
    defaults = Settings()
    assert ENV_EXAMPLE["LLMOPS_IMAGE"] == f"ray-llmops:{VERSION}-gpu"
    assert f"${{LLMOPS_IMAGE:-ray-llmops:{VERSION}-gpu}}" == COMPOSE["x-llmops"]["image"]
    for manifest in ("raycluster.yaml", "rayjob-finetune.yaml", "rayservice.yaml"):
        images = set(re.findall(r"image: (\S+)", (CLUSTER / "kuberay" / manifest).read_text()))
        assert images == {f"ghcr.io/example/ray-llmops:{VERSION}-gpu"}, manifest
    ports = {"RAY_DASHBOARD_PORT": defaults.ray_dashboard_port, "RAY_CLIENT_PORT": defaults.ray_client_port,
             "SERVE_PORT": defaults.serve_port, "MLFLOW_PORT": defaults.mlflow_port, "CHAT_PORT": defaults.chat_port,
             "AIRFLOW_PORT": defaults.airflow_port}  # fmt: skip
    for key, port in ports.items():
        assert int(ENV_EXAMPLE[key]) == port, key
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    torch_pin = re.search(r"install torch==(\S+)", (REPO / "Makefile").read_text()).group(1)
    assert f"torch=={torch_pin}" in dockerfile and "--no-deps -r requirements/lock.txt" in dockerfile


def _crd_schema(kind: str) -> dict:
    return json.loads(gzip.decompress((SCHEMAS / f"ray.io_{kind}.v1.json.gz").read_bytes()))


@pytest.mark.parametrize(
    ("manifest", "kind"),
    [("raycluster.yaml", "rayclusters"), ("rayjob-finetune.yaml", "rayjobs"), ("rayservice.yaml", "rayservices")],
)
def test_kuberay_manifests_match_the_crd_schemas(manifest, kind):
    document = yaml.safe_load((CLUSTER / "kuberay" / manifest).read_text())
    assert document["apiVersion"] == "ray.io/v1"
    jsonschema.validate(document, _crd_schema(kind))


def test_kuberay_schema_check_catches_a_broken_manifest():
    document = yaml.safe_load((CLUSTER / "kuberay" / "raycluster.yaml").read_text())
    document["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "four"
    with pytest.raises(jsonschema.ValidationError, match="four"):
        jsonschema.validate(document, _crd_schema("rayclusters"))


def test_rayservice_serve_config_is_generated_from_gpu_yaml():
    done = subprocess.run(["python", str(CLUSTER / "kuberay" / "render_rayservice.py"), "--check"],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    service = yaml.safe_load((CLUSTER / "kuberay" / "rayservice.yaml").read_text())
    gpu = yaml.safe_load((REPO / "serve_configs" / "gpu.yaml").read_text())
    assert yaml.safe_load(service["spec"]["serveConfigV2"]) == gpu
    cluster = yaml.safe_load((CLUSTER / "kuberay" / "raycluster.yaml").read_text())
    serving = json.dumps(service["spec"]["rayClusterConfig"])
    assert "llmops-secrets" not in serving and serving.count("llmops-serve-secrets") == 2  # head and workers
    assert json.loads(serving.replace("llmops-serve-secrets", "llmops-secrets")) == cluster["spec"]


def test_ray_up_config_matches_rays_cluster_schema():
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    jsonschema.validate(config, schema)
    assert config["available_node_types"]["gpu_worker"]["node_config"]["InstanceType"].startswith("p")
    assert config["setup_commands"] and config["file_mounts"]["/home/ubuntu/llmops.env"] == "cluster/.env"


def _depends(service: str) -> set[str]:
    """Every service ``service`` waits for, directly or through another."""
    seen, todo = set(), [service]
    while todo:
        for name in COMPOSE["services"][todo.pop()].get("depends_on", {}):
            if name not in seen:
                seen.add(name)
                todo.append(name)
    return seen


def test_compose_refuses_to_start_with_placeholders_and_every_service_waits_for_that_check(tmp_path):
    preflight = COMPOSE["services"]["preflight"]
    required = preflight["environment"]["LLMOPS_REQUIRED_SECRETS"].split()
    assert {"MINIO_ROOT_PASSWORD", "LLMOPS_CHAT_USERS", "CHECKPOINT_SIGNING_KEY"} <= set(required)
    assert set(required) <= set(preflight["environment"]) and set(required) <= set(ENV_EXAMPLE)
    for name in COMPOSE["services"]:
        assert name == "preflight" or "preflight" in _depends(name), f"{name} starts before the preflight check"

    def run(values: dict[str, str]) -> subprocess.CompletedProcess:
        env = {"PATH": "/usr/bin:/bin", "LLMOPS_REQUIRED_SECRETS": " ".join(required), **values}
        return subprocess.run(["sh", str(CLUSTER / "preflight.sh")], env=env, capture_output=True, text=True)

    example = run({name: ENV_EXAMPLE[name] for name in required})  # .env.example as it is committed
    assert example.returncode == 1 and all(name in example.stderr for name in required), example.stderr
    assert "change-me" not in example.stderr.replace("'change-me'", ""), "values are never printed"
    two_left = run(
        {name: f"s3cr3t-{name}" for name in required} | {"RAY_AUTH_TOKEN": "", "LLMOPS_API_KEYS": "a,change-me"}
    )
    assert two_left.returncode == 1 and two_left.stderr.split(":")[-1].split() == ["RAY_AUTH_TOKEN", "LLMOPS_API_KEYS"]
    assert run({name: f"s3cr3t-{name}" for name in required}).returncode == 0


def test_each_service_holds_only_its_own_credentials_and_none_on_a_command_line():
    services = COMPOSE["services"]
    node = COMPOSE["x-ray-node-env"]
    assert node["AWS_SECRET_ACCESS_KEY"] == "${TRAINING_S3_SECRET_KEY:?set in cluster/.env}"
    assert services["ray-head"]["environment"] == services["ray-gpu-worker"]["environment"] == node
    assert services["mlflow"]["environment"]["AWS_SECRET_ACCESS_KEY"].startswith("${MLFLOW_S3_SECRET_KEY")
    chat = services["chat"]["environment"]
    assert not [key for key in chat if key.startswith("AWS_") or key == "RAY_AUTH_TOKEN"], chat
    assert "RAY_AUTH_TOKEN" in services["serve"]["environment"]
    assert not [key for key in services["serve"]["environment"] if key.startswith("AWS_SECRET")]
    root = [name for name, service in services.items()
            if "MINIO_ROOT_PASSWORD" in json.dumps(service.get("environment", {}))]  # fmt: skip
    assert set(root) == {"preflight", "minio", "minio-init"}, root
    secret = re.compile(r"\$\{[A-Z_]*(PASSWORD|SECRET|TOKEN|API_KEYS|SIGNING_KEY)")
    for name, service in services.items():
        for field in ("command", "entrypoint"):
            assert not secret.search(json.dumps(service.get(field, ""))), f"{name}'s {field} holds a secret"


def test_minio_init_creates_one_least_privilege_user_per_service(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "mc").write_text('#!/bin/sh\necho "$*" >> "$MC_LOG"\n')
    (bin_dir / "mc").chmod(0o755)
    keys = {f"{service}_S3_{part}_KEY": f"{service.lower()}-{part.lower()}"
            for service in ("TRAINING", "MLFLOW", "SERVE") for part in ("ACCESS", "SECRET")}  # fmt: skip
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "MC_LOG": str(tmp_path / "mc.log"), "POLICY_DIR": str(CLUSTER / "minio"),
           "WORK_DIR": str(tmp_path), "MINIO_ROOT_USER": "root", "MINIO_ROOT_PASSWORD": "rootpw",
           "LLMOPS_BUCKET": "bucket-a", "MLFLOW_BUCKET": "bucket-m", **keys}  # fmt: skip
    done = subprocess.run(["bash", str(CLUSTER / "minio" / "init.sh")], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    calls = (tmp_path / "mc.log").read_text().splitlines()
    assert "mb --ignore-existing local/bucket-a local/bucket-m" in calls
    for service in ("training", "mlflow", "serve"):
        assert f"admin user add local {service}-access {service}-secret" in calls
        assert f"admin policy attach local llmops-{service} --user {service}-access" in calls

    def statements(service: str) -> list[dict]:
        policy = json.loads((tmp_path / f"{service}-policy.json").read_text())
        assert policy["Version"] == "2012-10-17"
        return policy["Statement"]

    def grants(service: str) -> set[tuple[str, str]]:
        return {
            (action, resource) for st in statements(service) for action in st["Action"] for resource in st["Resource"]
        }

    everything = grants("training") | grants("mlflow") | grants("serve")
    assert not [g for g in everything if g[0] in ("s3:*", "s3:DeleteBucket") or g[1] in ("*", "arn:aws:s3:::*")]
    assert ("s3:PutObject", "arn:aws:s3:::bucket-a/store/*") in grants("training")
    assert ("s3:PutObject", "arn:aws:s3:::bucket-m/*") in grants("mlflow")
    assert not [g for g in grants("mlflow") if "bucket-a" in g[1]] and not [
        g for g in grants("training") if "bucket-m" in g[1]
    ]
    assert {action for action, _ in grants("serve")} == {"s3:GetObject", "s3:ListBucket", "s3:GetBucketLocation"}
    assert ("s3:GetObject", "arn:aws:s3:::bucket-a/store/models/*") in grants("serve")
    listing = [st for st in statements("serve") if "s3:ListBucket" in st["Action"]]
    assert listing[0]["Condition"] == {"StringLike": {"s3:prefix": ["store/models/*"]}}


def test_compose_mlflow_runs_its_basic_auth_app_on_postgresql_and_each_client_has_an_identity(tmp_path):
    import configparser

    services = COMPOSE["services"]
    mlflow = services["mlflow"]
    script = mlflow["command"][0]
    assert "exec mlflow server --app-name basic-auth" in script and mlflow["entrypoint"] == ["/bin/sh", "-c"]
    assert mlflow["environment"]["MLFLOW_AUTH_DATABASE_URI"].endswith("@postgres:5432/mlflow_auth")
    assert "CREATE DATABASE mlflow_auth OWNER mlflow" in (CLUSTER / "postgres-init" / "01-databases.sh").read_text()
    # The start script writes the auth config from the environment: run it with `exec` stubbed out.
    config = tmp_path / "auth.ini"
    env = {"PATH": "/usr/bin:/bin", "MLFLOW_AUTH_CONFIG_PATH": str(config),
           "MLFLOW_AUTH_DATABASE_URI": "postgresql+psycopg2://mlflow:pw@postgres:5432/mlflow_auth"}  # fmt: skip
    runnable = script.replace("$$", "$").split("exec mlflow server")[0] + "true"
    done = subprocess.run(["sh", "-c", runnable], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    parsed = configparser.ConfigParser()
    parsed.read(config)
    assert dict(parsed["mlflow"]) == {
        "default_permission": "READ", "database_uri": env["MLFLOW_AUTH_DATABASE_URI"],
        "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth", "auth_cache_ttl_seconds": "60",
    }  # fmt: skip
    assert oct(config.stat().st_mode & 0o777) == "0o600"

    node = COMPOSE["x-ray-node-env"]
    assert node["MLFLOW_TRACKING_USERNAME"] == "admin" and "MLFLOW_ADMIN_PASSWORD" in node["MLFLOW_TRACKING_PASSWORD"]
    assert services["serve"]["environment"]["MLFLOW_TRACKING_USERNAME"] == "llmops-serve"
    assert services["mlflow-init"]["command"] == ["llmops", "mlflow-users"]
    assert "mlflow-init" in _depends("ray-head") and "mlflow-init" in _depends("chat")
    assert not [key for key in services["chat"]["environment"] if key.startswith("MLFLOW_TRACKING_")]


def test_compose_monitoring_scrapes_ray_and_the_chat_and_provisions_the_dashboards(tmp_path):
    services = COMPOSE["services"]
    prometheus, grafana = services["prometheus"], services["grafana"]
    assert "ports" not in prometheus, "Prometheus has no login here: it must not be published on the host"
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD:?")
    assert "ray-tmp:/tmp/ray" in services["ray-head"]["volumes"] and "ray-tmp:/tmp/ray:ro" in prometheus["volumes"]
    assert COMPOSE["secrets"]["metrics_token"] == {"environment": "METRICS_TOKEN"}
    assert services["chat"]["environment"]["LLMOPS_METRICS_TOKEN"].startswith("${METRICS_TOKEN:?")
    assert COMPOSE["x-ray-node-env"]["RAY_PROMETHEUS_HOST"] == "http://prometheus:9090"

    # The config as the container sees it, with the secret's file where the test can make one.
    config = (CLUSTER / "prometheus" / "prometheus.yml").read_text()
    (tmp_path / "token").write_text("t")
    (tmp_path / "prometheus.yml").write_text(config.replace("/run/secrets/metrics_token", str(tmp_path / "token")))
    shutil.copy(CLUSTER / "prometheus" / "alerts.yml", tmp_path / "alerts.yml")
    checked = subprocess.run(["promtool", "check", "config", str(tmp_path / "prometheus.yml")],
                             capture_output=True, text=True)  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr
    jobs = {job["job_name"]: job for job in yaml.safe_load(config)["scrape_configs"]}
    assert jobs["ray"]["file_sd_configs"][0]["files"] == ["/tmp/ray/prom_metrics_service_discovery.json"]
    assert jobs["chat"]["static_configs"][0]["targets"] == ["chat:8800"]

    [source] = yaml.safe_load((CLUSTER / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"]
    for dashboard in (CLUSTER / "grafana" / "dashboards").glob("*.json"):
        for panel in json.loads(dashboard.read_text())["panels"]:
            assert panel["datasource"]["uid"] == source["uid"], (dashboard.name, panel["title"])
    providers = yaml.safe_load((CLUSTER / "grafana/provisioning/dashboards/llmops.yml").read_text())["providers"]
    paths = {provider["options"]["path"] for provider in providers}
    mounted = {volume.split(":")[1] for volume in grafana["volumes"]}
    assert all(any(path.startswith(mount) for mount in mounted) for path in paths), (paths, mounted)


def test_kuberay_monitoring_configmaps_are_generated_from_the_dashboards_and_rules():
    done = subprocess.run(["python", str(CLUSTER / "grafana" / "build_dashboards.py"), "--check"],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    dashboards, rules = yaml.safe_load_all((CLUSTER / "kuberay" / "monitoring.yaml").read_text())
    assert dashboards["metadata"]["labels"] == {"grafana_dashboard": "1"}
    assert set(dashboards["data"]) == {path.name for path in (CLUSTER / "grafana" / "dashboards").glob("*.json")}
    assert rules["data"]["alerts.yml"] == (CLUSTER / "prometheus" / "alerts.yml").read_text()
