# syntax=docker/dockerfile:1
# Sluice services: one slim, non-root image, one build target per service.
#   docker build --target gateway -t sluice-gateway .      (likewise redaction, prompts,
#   inference, metering, audit; the default target runs `sluice --help`)
# The Helm chart and docker-compose.yml use the default image and pass `serve <service>`.
# The TensorRT-LLM worker has its own image: docker/trtllm-worker.Dockerfile.

ARG PYTHON_IMAGE=python:3.12-slim-bookworm

# ---- build: compile llama-cpp-python once and turn every dependency into a wheel ----
FROM ${PYTHON_IMAGE} AS build
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake git \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Dependencies first, so editing Sluice's code does not rebuild llama.cpp.
COPY pyproject.toml README.md ./
RUN mkdir -p sluice services streams && touch sluice/__init__.py services/__init__.py streams/__init__.py \
 && pip wheel --no-cache-dir --wheel-dir /wheels . \
 && rm -f /wheels/sluice-*.whl
COPY sluice ./sluice
COPY services ./services
COPY streams ./streams
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# ---- runtime: wheels only, no compilers, no source checkout ----
FROM ${PYTHON_IMAGE} AS runtime
# libgomp1: llama.cpp's OpenMP threads.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 sluice \
 && useradd --system --uid 10001 --gid sluice --home-dir /var/lib/sluice --create-home sluice
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels /wheels/sluice-*.whl
COPY schemas /etc/sluice/schemas
# Containers listen on every interface; the topic plan is read from the image;
# state (keys, SQLite indexes) goes to a volume the chart mounts.
ENV SLUICE_HOST=0.0.0.0 \
    SLUICE_TOPICS_FILE=/etc/sluice/schemas/topics.yaml \
    SLUICE_STATE_DIR=/var/lib/sluice \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
WORKDIR /var/lib/sluice
ENTRYPOINT ["sluice"]
CMD ["--help"]

# ---- one target per service: gRPC port, metrics port (gRPC + 1000) ----
FROM runtime AS gateway
EXPOSE 50051 51051
CMD ["serve", "gateway"]

FROM runtime AS redaction
EXPOSE 50052 51052
CMD ["serve", "redaction"]

FROM runtime AS prompts
EXPOSE 50053 51053
CMD ["serve", "prompts"]

FROM runtime AS inference
EXPOSE 50054 51054
CMD ["serve", "inference"]

FROM runtime AS metering
EXPOSE 50055 51055
CMD ["serve", "metering"]

FROM runtime AS audit
EXPOSE 50056 51056
CMD ["serve", "audit"]

# Default target: the plain image, `sluice <command>`.
FROM runtime AS sluice
