"""DAGs the tests run to check RayJobOperator against a real Ray head: failure, retry, timeout."""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import DAG

from ray_app.orchestration.operators import RayJobOperator

START = pendulum.datetime(2026, 1, 1, tz="UTC")
FAIL = "python -c \"import sys; print('loading the data'); print('boom: bad record 7', file=sys.stderr); sys.exit(3)\""
# Prints while it works for ~20 s, then reports a result the operator returns as the XCom.
SLOW = ("python -c \"import time; from ray_app.orchestration.ray_jobs import emit_result\n"
        "for i in range(10):\n    print('working', i, flush=True); time.sleep(2)\n"
        "emit_result({'answer': 42})\"")  # fmt: skip


class LosesItsWorkerAfterSubmitting(RayJobOperator):
    """The first try dies right after submitting (as a killed worker would); its retry must re-attach."""

    def execute(self, context):
        self.try_number = context["ti"].try_number
        return super().execute(context)

    def defer(self, **kwargs):
        if self.try_number == 1:
            raise RuntimeError("worker lost right after submitting the job (simulated)")
        super().defer(**kwargs)


# Three independent tasks in one DAG, so one `airflow dags test` checks them all.
with DAG("ray_job_checks", schedule=None, start_date=START, catchup=False):
    RayJobOperator(task_id="fails", entrypoint=FAIL, poll_interval=1, retries=0)
    LosesItsWorkerAfterSubmitting(
        task_id="retried", entrypoint=SLOW, poll_interval=1, retries=1, retry_delay=timedelta(seconds=1)
    )
    RayJobOperator(
        task_id="times_out", entrypoint=SLOW, poll_interval=1, retries=0, execution_timeout=timedelta(seconds=6)
    )
