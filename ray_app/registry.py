"""MLflow tracking and the model registry: register store folders as versions, move aliases, resolve them.

A registered version's ``source`` is the store URI of a consolidated Hugging Face folder
(``s3://...`` or a path), so Serve and evaluation load it with :func:`ray_app.models.resolve_model`
without MLflow copying hundreds of MB of weights into its own artifact store.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from ray_app.credentials import node_env
from ray_app.settings import Settings, get_settings

MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[\w-]+)|/(?P<version>\d+))$")


class RegistryError(RuntimeError):
    """The tracking server cannot be reached or a name/alias/version does not exist."""


@dataclass(frozen=True)
class ModelVersionRef:
    """A registered version: where its weights are and which run made it."""

    name: str
    version: str
    source: str
    run_id: str | None
    tags: dict[str, str]


def configure_tracking(settings: Settings | None = None) -> str:
    """Point the mlflow client (and its S3 artifact client) at the configured server; returns the URI."""
    import mlflow

    settings = settings or get_settings()
    for key, value in node_env(settings).items():  # this process's own clients (mlflow, boto3)
        if key.startswith(("MLFLOW_", "AWS_")):
            os.environ[key] = value
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    return str(settings.mlflow_tracking_uri)


def ensure_read_only_user(settings: Settings) -> str:
    """Create (or re-key) Serve's read-only MLflow user as this process's identity (the admin).

    MLflow's basic-auth app gives every user ``default_permission`` (READ, see
    ``ray_app.stack``) on what others created: this user can resolve ``models:/`` and read
    artifacts, and is refused (403) moving an alias or editing a version.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.server.auth.client import AuthServiceClient

    from ray_app.credentials import mlflow_identity, mlflow_serve_identity, speaking_as

    user, password = mlflow_serve_identity(settings)
    auth = AuthServiceClient(str(settings.mlflow_tracking_uri))
    try:
        with speaking_as(mlflow_identity(settings)):
            try:
                auth.get_user(user)
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                auth.create_user(user, password)
            else:
                auth.update_user_password(user, password)
    except MlflowException as exc:
        raise RegistryError(f"cannot set up MLflow user {user} at {auth.tracking_uri}: {exc.message}") from exc
    return user


def check_tracking(settings: Settings | None = None) -> str:
    """Fail fast, naming the URL, when the tracking server cannot be reached or refuses this identity."""
    from mlflow.exceptions import MlflowException

    mlflow_client = client(settings)
    try:
        mlflow_client.search_experiments(max_results=1)
    except MlflowException as exc:
        raise RegistryError(
            f"the MLflow tracking server at {mlflow_client.tracking_uri} is unusable: {exc.message}"
        ) from None
    return mlflow_client.tracking_uri


def client(settings: Settings | None = None):
    """An MlflowClient on the configured tracking server."""
    from mlflow import MlflowClient

    return MlflowClient(configure_tracking(settings))


def _ref(version) -> ModelVersionRef:
    return ModelVersionRef(
        name=version.name,
        version=str(version.version),
        source=version.source,
        run_id=version.run_id,
        tags=dict(version.tags or {}),
    )


def versions_using(uri: str, settings: Settings | None = None) -> list[ModelVersionRef]:
    """Registered versions (of any model) whose source folder is ``uri``, inside it, or contains it.

    Raises RegistryError naming the tracking server when it cannot be asked.
    """
    from mlflow.exceptions import MlflowException

    target = uri.rstrip("/")
    mlflow_client = client(settings)
    found, token = [], None
    try:
        while True:
            page = mlflow_client.search_model_versions(max_results=1000, page_token=token)
            for version in page:
                source = (version.source or "").rstrip("/")
                if source == target or source.startswith(target + "/") or target.startswith(source + "/"):
                    found.append(_ref(version))
            token = page.token
            if not token:
                return found
    except MlflowException as exc:
        raise RegistryError(f"cannot list model versions at {mlflow_client.tracking_uri}: {exc.message}") from exc


def register_model_version(
    name: str,
    source: str,
    run_id: str | None,
    tags: dict[str, str] | None = None,
    alias: str | None = None,
    settings: Settings | None = None,
) -> ModelVersionRef:
    """Register ``source`` as a version of ``name`` with ``tags`` and ``alias``; idempotent by run id.

    A retry after a failure anywhere in between (the version created but not tagged or
    aliased, say) finds the version this run already registered and completes it, so a run
    yields exactly one version. Raises RegistryError naming the tracking server.
    """
    from mlflow.exceptions import MlflowException

    mlflow_client = client(settings)
    tags = tags or {}
    try:
        try:
            mlflow_client.get_registered_model(name)
        except MlflowException:
            mlflow_client.create_registered_model(name, description="chat model fine-tuned with ray-llmops")
        version = _version_of_run(mlflow_client, name, run_id, source)
        if version is None:
            version = mlflow_client.create_model_version(name, source=source, run_id=run_id, tags=tags)
        for key, value in tags.items():
            if (version.tags or {}).get(key) != value:
                mlflow_client.set_model_version_tag(name, version.version, key, value)
        if alias:
            mlflow_client.set_registered_model_alias(name, alias, version.version)
        version = mlflow_client.get_model_version(name, version.version)
    except MlflowException as exc:
        raise RegistryError(f"cannot register {name} at {mlflow_client.tracking_uri}: {exc.message}") from exc
    return _ref(version)


def _version_of_run(mlflow_client, name: str, run_id: str | None, source: str):
    """The version of ``name`` that ``run_id`` already registered from ``source``, if any."""
    if not run_id:
        return None
    found = [
        version
        for version in mlflow_client.search_model_versions(f"name = '{_quoted(name)}' and run_id = '{_quoted(run_id)}'")
        if version.source == source
    ]
    return min(found, key=lambda version: int(version.version)) if found else None


def _quoted(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def set_alias(name: str, alias: str, version: str, settings: Settings | None = None) -> None:
    """Point ``alias`` of ``name`` at ``version``; RegistryError (naming MLflow) when it cannot."""
    from mlflow.exceptions import MlflowException

    mlflow_client = client(settings)
    try:
        mlflow_client.set_registered_model_alias(name, alias, version)
    except MlflowException as exc:
        raise RegistryError(f"cannot move alias {alias} of {name} to version {version} at "
                            f"{mlflow_client.tracking_uri}: {exc.message}") from exc  # fmt: skip


def tag_version(name: str, version: str, tags: dict[str, str], settings: Settings | None = None) -> None:
    """Set ``tags`` on registered version ``name``/``version``; RegistryError (naming MLflow) when it cannot."""
    from mlflow.exceptions import MlflowException

    mlflow_client = client(settings)
    try:
        for key, value in tags.items():
            mlflow_client.set_model_version_tag(name, version, key, value)
    except MlflowException as exc:
        raise RegistryError(f"cannot tag {name}/{version} at {mlflow_client.tracking_uri}: {exc.message}") from exc


def get_version(uri: str, settings: Settings | None = None) -> ModelVersionRef:
    """The version behind ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``."""
    from mlflow.exceptions import MlflowException

    match = MODELS_URI.match(uri)
    if not match:
        raise RegistryError(f"not a registry URI: {uri!r}; expected models:/NAME@ALIAS or models:/NAME/VERSION")
    mlflow_client = client(settings)
    try:
        if match["alias"]:
            version = mlflow_client.get_model_version_by_alias(match["name"], match["alias"])
        else:
            version = mlflow_client.get_model_version(match["name"], match["version"])
    except MlflowException as exc:
        raise RegistryError(f"{uri} not found at {mlflow_client.tracking_uri}: {exc.message}") from exc
    return _ref(version)
