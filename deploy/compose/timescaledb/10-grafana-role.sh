#!/bin/sh
# Runs once, when the official image initializes an empty data directory
# (/docker-entrypoint-initdb.d): a read-only role for Grafana's data source.
# pg_read_all_data (PostgreSQL 14+) covers tables the migrations create later too.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
     -v ro_user="$GRAFANA_PG_USER" -v ro_password="$GRAFANA_PG_PASSWORD" <<'SQL'
CREATE ROLE :"ro_user" LOGIN PASSWORD :'ro_password';
GRANT pg_read_all_data TO :"ro_user";
ALTER ROLE :"ro_user" SET default_transaction_read_only = on;
SQL
