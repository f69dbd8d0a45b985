#!/bin/sh
# Refuses to start the stack while cluster/.env still holds a placeholder or an empty secret.
# Runs as the compose service `preflight`; PostgreSQL and MinIO (so every other service) wait
# for it to succeed. LLMOPS_REQUIRED_SECRETS names the variables to check; their values are
# never printed.
set -u
bad=""
for name in $LLMOPS_REQUIRED_SECRETS; do
  eval "value=\${$name:-}"
  case "$value" in
    "" | *change-me*) bad="$bad $name" ;;
  esac
done
if [ -n "$bad" ]; then
  echo "refusing to start: replace the empty or 'change-me' values of these in cluster/.env:$bad" >&2
  exit 1
fi
echo "preflight: every secret is set"
