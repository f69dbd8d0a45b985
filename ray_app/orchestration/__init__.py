"""Orchestration: Airflow reaches Ray only through the Ray Jobs API.

``ray_jobs`` holds the Jobs API logic with no Airflow import (unit-testable, reusable),
``operators`` the deferrable Airflow operator and trigger over it, and ``pipeline`` the
steps of the retraining DAG as job entrypoints that run on the Ray cluster.
"""
