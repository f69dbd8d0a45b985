"""The Ray head from the stack: tasks, the Jobs API, and Ray Train checkpoints into the S3 store."""

from __future__ import annotations

import sys
import time
import uuid

from ray_app.settings import Settings
from ray_app.storage import open_store


def test_tasks_run_on_the_head(ray_client: Settings):
    import ray

    @ray.remote
    def square(x: int) -> int:
        return x * x

    assert ray.get([square.remote(i) for i in range(8)]) == [i * i for i in range(8)]
    assert ray.cluster_resources()["CPU"] == 2


def test_jobs_run_with_this_venv_and_the_settings_env(ray_cluster: Settings):
    from ray.job_submission import JobStatus, JobSubmissionClient

    ray_cluster.apply_ray_client_env()
    client = JobSubmissionClient(ray_cluster.ray_dashboard_url)
    job_id = client.submit_job(
        entrypoint=(
            "python -c \"import os, sys; print('PREFIX', sys.prefix); "
            "print('MLFLOW', os.environ['MLFLOW_TRACKING_URI'])\""
        ),
        submission_id=f"probe-{uuid.uuid4().hex[:8]}",
    )
    deadline = time.monotonic() + 120
    while client.get_job_status(job_id) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.monotonic() < deadline, "job did not finish in 120 s"
        time.sleep(1)
    logs = client.get_job_logs(job_id)
    assert client.get_job_status(job_id) == JobStatus.SUCCEEDED, logs
    assert f"PREFIX {sys.prefix}" in logs
    assert f"MLFLOW {ray_cluster.mlflow_tracking_uri}" in logs


def test_ray_train_reports_checkpoints_into_the_s3_store(ray_client: Settings):
    import ray.train
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def loop(config: dict) -> None:
        import json
        import tempfile
        from pathlib import Path

        for step in range(1, 4):
            with tempfile.TemporaryDirectory() as tmp:
                Path(tmp, "state.json").write_text(json.dumps({"step": step}))
                ray.train.report({"step": step}, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    store = open_store(settings=ray_client)
    store.ensure()
    storage_path, filesystem = store.ray_storage()
    name = f"probe-{uuid.uuid4().hex[:8]}"
    trainer = TorchTrainer(
        loop,
        scaling_config=ScalingConfig(num_workers=1, use_gpu=False),
        run_config=RunConfig(
            name=name,
            storage_path=f"{storage_path}/ray-train",
            storage_filesystem=filesystem,
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()

    assert result.checkpoint is not None
    keys = [info.key for info in store.list(f"ray-train/{name}")]
    states = sorted(key for key in keys if key.endswith("state.json"))
    assert len(states) == 2, keys  # num_to_keep pruned the first one
    with result.checkpoint.as_directory() as folder:
        import json
        from pathlib import Path

        assert json.loads(Path(folder, "state.json").read_text()) == {"step": 3}
