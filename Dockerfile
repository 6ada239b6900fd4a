# syntax=docker/dockerfile:1
# Build stage: a wheel of crmstream and its pinned dependencies.
FROM python:3.11.7-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY crmstream crmstream
COPY config config
COPY flows flows
COPY operators operators
COPY state state
COPY bench bench
# With the fit extra: `crmstream fit` runs in the image against the deployment's Redis.
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[fit]"

# Runtime stage: non-root, only the wheels.
FROM python:3.11.7-slim-bookworm
RUN useradd --create-home --uid 10001 crm
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER crm
WORKDIR /home/crm
ENV CRMSTREAM__METRICS__BIND_ADDRESS=0.0.0.0 \
    NUMBA_CACHE_DIR=/home/crm/.numba
EXPOSE 9464
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s \
  CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:9464/metrics', timeout=2)" || exit 1
ENTRYPOINT ["crmstream"]
CMD ["run"]
