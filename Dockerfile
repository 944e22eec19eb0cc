# syntax=docker/dockerfile:1
# The telemetry service: gunicorn (api/gunicorn_conf.py) serving `api:create_app()`.
# Stage 1 builds a virtualenv with the project and its dependencies; stage 2 is
# the same slim base with only that virtualenv, run as an unprivileged user.

FROM python:3.11-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY api ./api
COPY db ./db
COPY analytics ./analytics
RUN python -m venv /opt/telemetry \
    && /opt/telemetry/bin/pip install --upgrade pip \
    && /opt/telemetry/bin/pip install .

FROM python:3.11-slim-bookworm
RUN groupadd --system --gid 10001 telemetry \
    && useradd --system --uid 10001 --gid telemetry --home-dir /srv/telemetry \
               --create-home --shell /usr/sbin/nologin telemetry \
    && install -d -o telemetry -g telemetry /srv/telemetry/data
COPY --from=build /opt/telemetry /opt/telemetry
ENV PATH=/opt/telemetry/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TELEMETRY_BIND=0.0.0.0:8000 \
    TELEMETRY_DATABASE_URL=sqlite:////srv/telemetry/data/telemetry.db \
    PROMETHEUS_MULTIPROC_DIR=/tmp/telemetry-metrics
WORKDIR /srv/telemetry
USER telemetry:telemetry
EXPOSE 8000
VOLUME ["/srv/telemetry/data"]
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=2).status != 200)"]
# `telemetry serve` migrates the database, then execs gunicorn; SIGTERM from
# `docker stop` reaches gunicorn, which lets requests in flight commit
# (TELEMETRY_GRACEFUL_TIMEOUT, keep it below the stop timeout in compose).
CMD ["telemetry", "serve"]
