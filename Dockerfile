# syntax=docker/dockerfile:1
# Build stage: wheels of crmstream's pinned dependencies, then of crmstream itself.
FROM python:3.11.7-slim-bookworm AS build
WORKDIR /src
# Dependencies first, from pyproject.toml alone (with the fit extra: `crmstream fit`
# runs in the image): this layer is rebuilt only when pyproject.toml changes.
COPY pyproject.toml deploy/docker/requirements.py ./
RUN python requirements.py pyproject.toml > requirements.txt \
 && pip wheel --no-cache-dir --wheel-dir /wheels/deps -r requirements.txt
COPY README.md ./
COPY crmstream crmstream
COPY config config
COPY flows flows
COPY operators operators
COPY state state
COPY bench bench
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels/app .

# Runtime stage: non-root, only the wheels; the dependencies' layer first.
FROM python:3.11.7-slim-bookworm
RUN useradd --create-home --uid 10001 crm
RUN --mount=type=bind,from=build,source=/wheels/deps,target=/wheels/deps \
    pip install --no-cache-dir /wheels/deps/*.whl
RUN --mount=type=bind,from=build,source=/wheels/app,target=/wheels/app \
    pip install --no-cache-dir --no-deps /wheels/app/*.whl
USER crm
WORKDIR /home/crm
ENV CRMSTREAM__METRICS__BIND_ADDRESS=0.0.0.0 \
    NUMBA_CACHE_DIR=/home/crm/.numba
EXPOSE 9464
# No HEALTHCHECK here: the same image runs `topics create` and `generate`, which serve no
# metrics. The flow's health check is in docker-compose.yml (and probes in deploy/k8s/).
# crmstream is PID 1 and handles SIGTERM itself: `docker stop` drains it (exit 0).
STOPSIGNAL SIGTERM
ENTRYPOINT ["crmstream"]
CMD ["run"]
