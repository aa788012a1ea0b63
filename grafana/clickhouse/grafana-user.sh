#!/bin/bash
# Grafana's read-only ClickHouse user, for the ClickHouse datasource
# (grafana/provisioning/datasources). Run by the clickhouse-server image from
# /docker-entrypoint-initdb.d/ on every start (CLICKHOUSE_ALWAYS_RUN_INITDB_SCRIPTS),
# so it is idempotent and a changed GRAFANA_CLICKHOUSE_PASSWORD takes effect
# at the next restart. readonly = 1: a dashboard query can never write or drop;
# max_execution_time stays changeable because the plugin sets it per query.
clickhouse client --user "$CLICKHOUSE_USER" --password "$CLICKHOUSE_PASSWORD" --multiquery <<SQL
CREATE SETTINGS PROFILE IF NOT EXISTS grafana_readonly
    SETTINGS readonly = 1, max_execution_time = 60 CHANGEABLE_IN_READONLY;
CREATE USER IF NOT EXISTS grafana
    IDENTIFIED WITH sha256_password BY '${GRAFANA_CLICKHOUSE_PASSWORD}'
    SETTINGS PROFILE 'grafana_readonly';
ALTER USER grafana IDENTIFIED WITH sha256_password BY '${GRAFANA_CLICKHOUSE_PASSWORD}';
GRANT SELECT ON journey.* TO grafana;
SQL
