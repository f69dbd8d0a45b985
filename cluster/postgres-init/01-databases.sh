#!/bin/bash
# Runs once, on the first start of an empty PostgreSQL volume (docker-entrypoint-initdb.d):
# one database and one owner per service, passwords from the environment (cluster/.env).
set -euo pipefail
for service in mlflow airflow chat; do
  upper=${service^^}
  password_var="${upper}_DB_PASSWORD"
  password=${!password_var:?set ${password_var} in cluster/.env}
  psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
       -v user="$service" -v password="$password" <<'SQL'
SELECT format('CREATE ROLE %I LOGIN PASSWORD %L', :'user', :'password')
WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'user') \gexec
SELECT format('CREATE DATABASE %I OWNER %I', :'user', :'user')
WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = :'user') \gexec
SQL
done
# MLflow's basic-auth app keeps users and permissions in a database of its own (its migrations
# would collide with the tracking store's), owned by the same role.
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres <<'SQL'
SELECT 'CREATE DATABASE mlflow_auth OWNER mlflow'
WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = 'mlflow_auth') \gexec
SQL
