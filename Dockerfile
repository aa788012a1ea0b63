# The journey worker (and `journey simulate`, `journey send`, `journey report`)
# for docker-compose.yml. One image: the command picks the role.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
# Dependencies first, so a code change does not reinstall them.
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY schemas ./schemas
# The worker applies these ClickHouse DDL files at start-up (found beside the package).
COPY deploy/clickhouse ./deploy/clickhouse
RUN pip install -e . \
    && useradd --system --uid 10001 --home-dir /var/lib/journey --create-home journey

# Faust keeps its small local state in the working directory: the user's own.
WORKDIR /var/lib/journey
USER journey

ENV JOURNEY_WEB_HOST=0.0.0.0 \
    JOURNEY_WEB_PORT=6066
EXPOSE 6066
# /healthz answers 200 once the worker is consuming, 503 while it starts.
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=6 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('JOURNEY_WEB_PORT', '6066'), timeout=2)"]
ENTRYPOINT ["journey"]
CMD ["worker"]
