# syntax=docker/dockerfile:1
# Inference worker for GPU nodes: Sluice's inference service on top of NVIDIA's
# TensorRT-LLM release container, which brings CUDA, TensorRT and `tensorrt_llm`
# (the wheels exist only for Python 3.10/3.12 and only from NVIDIA's index).
#   docker build -f docker/trtllm-worker.Dockerfile -t sluice-trtllm-worker .
# Run it with a models file whose model uses `engine: trtllm` (SLUICE_MODELS_FILE)
# and one GPU (the Helm chart's inference.trtllm values request nvidia.com/gpu).
ARG TRTLLM_TAG=1.0.0
FROM nvcr.io/nvidia/tensorrt-llm/release:${TRTLLM_TAG}

WORKDIR /opt/sluice
COPY pyproject.toml README.md ./
COPY sluice ./sluice
COPY services ./services
COPY streams ./streams
COPY schemas /etc/sluice/schemas
# Sluice's own dependencies; tensorrt_llm and torch are already in the base image
# and are not touched (pip keeps installed packages that satisfy the requirements).
RUN pip install --no-cache-dir . \
 && python -c "import tensorrt_llm, sluice.cli" \
 && groupadd --system --gid 10001 sluice \
 && useradd --system --uid 10001 --gid sluice --home-dir /var/lib/sluice --create-home sluice

ENV SLUICE_HOST=0.0.0.0 \
    SLUICE_TOPICS_FILE=/etc/sluice/schemas/topics.yaml \
    SLUICE_STATE_DIR=/var/lib/sluice \
    PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /var/lib/sluice
EXPOSE 50054 51054
ENTRYPOINT ["sluice"]
CMD ["serve", "inference"]
