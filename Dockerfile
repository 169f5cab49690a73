# syntax=docker/dockerfile:1
# Estat ingest server: a small, non-root image running `twistd estat`.

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
# A C compiler for the compiled build of the hot modules (estat/_compiled.py);
# the runtime image below gets only the built venv.
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/estat
COPY setup.cfg setup.py pyproject.toml README.md constraints.txt ./
COPY estat ./estat
COPY twisted ./twisted
RUN /opt/estat/bin/pip install --no-cache-dir -c constraints.txt ".[parquet]" \
 && /opt/estat/bin/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" \
 && /opt/estat/bin/python -c "from estat._compiled import describe; print('estat build:', describe())"

FROM ${PYTHON_IMAGE}
RUN useradd --system --uid 10001 --home-dir /var/lib/estat --create-home estat \
 && mkdir -p /var/lib/estat/dlq /var/lib/estat/data \
 && chown -R estat:estat /var/lib/estat
COPY --from=build /opt/estat /opt/estat
ENV PATH=/opt/estat/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    DLQ_DIR=/var/lib/estat/dlq \
    LOCAL_STORE_DIR=/var/lib/estat/data \
    HTTP_ADDR=:8080 \
    LOG_FORMAT=json
USER estat
WORKDIR /var/lib/estat
VOLUME ["/var/lib/estat/dlq"]
EXPOSE 8080
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-m", "estat.healthcheck", "/healthz"]
ENTRYPOINT ["twistd", "--nodaemon", "--pidfile=", "--reactor=estat", "--logger=estat.logs.observer", "estat"]
