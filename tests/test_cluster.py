"""cluster/ validated offline: compose against the Compose spec, KubeRay manifests against the
CRD schemas, the `ray up` file against Ray's schema, and names cross-checked with the settings."""

from __future__ import annotations

import gzip
import json
import re
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
    r"^(POSTGRES_|MINIO_|AIRFLOW_|AIRFLOW__|_PIP_|MLFLOW_DB_|CHAT_DB_|LLMOPS_BUCKET|MLFLOW_BUCKET)"
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
    }  # fmt: skip
    assert expected <= set(services)
    one_shots = {name for name, service in services.items() if service.get("restart") == "no"}
    assert one_shots == {"minio-init", "serve", "airflow-init"}
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
    compose_env = dict(COMPOSE["x-llmops"]["environment"]) | COMPOSE["services"]["chat"]["environment"]
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
    assert service["spec"]["rayClusterConfig"] == cluster["spec"]


def test_ray_up_config_matches_rays_cluster_schema():
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    jsonschema.validate(config, schema)
    assert config["available_node_types"]["gpu_worker"]["node_config"]["InstanceType"].startswith("p")
    assert config["setup_commands"] and config["file_mounts"]["/home/ubuntu/llmops.env"] == "cluster/.env"
