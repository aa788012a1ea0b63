FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY schemas ./schemas
COPY deploy/clickhouse ./deploy/clickhouse
RUN pip install --no-cache-dir -e .
ENV JOURNEY_WEB_HOST=0.0.0.0
EXPOSE 6066
HEALTHCHECK --interval=10s --timeout=3s --retries=6 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:6066/healthz', timeout=2)"
ENTRYPOINT ["journey"]
CMD ["worker"]
