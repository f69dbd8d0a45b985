#!/bin/bash
# MinIO's buckets and one user per service, each with only what it needs (*-policy.json here):
#   training: the Ray nodes (jobs, training workers, the feedback export): read-write <bucket>/store/
#   mlflow:   the tracking server's artifact proxy: read-write on the MLflow bucket
#   serve:    a serving-only Ray cluster (KubeRay's RayService): read-only <bucket>/store/models/
# The chat has no store access. Runs as the `minio-init` one-shot with the root user; idempotent.
set -euo pipefail
POLICY_DIR=${POLICY_DIR:-/policies}
WORK_DIR=${WORK_DIR:-/tmp}

render() {  # the policy template $1 with the bucket names filled in, written to $2
  local text
  text=$(<"$1")
  text=${text//'${LLMOPS_BUCKET}'/$LLMOPS_BUCKET}
  printf '%s\n' "${text//'${MLFLOW_BUCKET}'/$MLFLOW_BUCKET}" >"$2"
}

mc alias set local http://minio:9000 "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD" >/dev/null
mc mb --ignore-existing "local/$LLMOPS_BUCKET" "local/$MLFLOW_BUCKET"
for service in training mlflow serve; do
  access_var="${service^^}_S3_ACCESS_KEY"
  secret_var="${service^^}_S3_SECRET_KEY"
  render "$POLICY_DIR/$service-policy.json" "$WORK_DIR/$service-policy.json"
  mc admin policy create local "llmops-$service" "$WORK_DIR/$service-policy.json"
  mc admin user add local "${!access_var}" "${!secret_var}"
  # Attaching twice is an error in mc; a policy that is already attached is what we want.
  mc admin policy attach local "llmops-$service" --user "${!access_var}" || true
done
echo "minio-init: buckets $LLMOPS_BUCKET and $MLFLOW_BUCKET; users for training, mlflow and serve"
