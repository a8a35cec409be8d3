# syntax=docker/dockerfile:1
#
# dgserve image. CPU by default; `--build-arg VARIANT=cuda` builds the GPU image.
#
#   docker build -t dgserve:cpu .
#   docker build -t dgserve:cuda --build-arg VARIANT=cuda .
#   docker run -p 8000:8000 -v dgserve-cache:/cache dgserve:cpu
#
# The install steps are the Makefile's (`pip install "$TORCH_SPEC"`, then the project), so the
# image runs the same dependency set as `make serve`; tests/test_deploy.py keeps them in step.
# Only the project install differs on purpose: non-editable and without the test extra.

# cpu | cuda. Declared before the first FROM so it can pick the base stage below; BuildKit
# (Docker's default builder) then builds only that base, never both.
ARG VARIANT=cpu
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# The CUDA runtime base and torch's CUDA wheel tag (CUDA_WHEEL_TAG below) must name the same
# CUDA release, and the pinned torch must publish a wheel for that tag.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu22.04

# ---- base stages: the only place the two variants differ, apart from torch's wheel index ----

FROM ${PYTHON_IMAGE} AS base-cpu

FROM ${CUDA_IMAGE} AS base-cuda
# Ubuntu 22.04 ships Python 3.11 in its archive; the project needs >= 3.11.
# Archive package versions are not pinned: Ubuntu drops superseded versions from its mirrors,
# so a pin would break rebuilds; the base image tag fixes the release instead.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
 && rm -rf /var/lib/apt/lists/*

# base-cpu or base-cuda, both stages above; hadolint cannot resolve the variable to a stage
# name and takes it for an untagged image.
# hadolint ignore=DL3006
FROM base-${VARIANT} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# ---- builder: a self-contained venv at /opt/venv, copied whole into the runtime stage ----

FROM base AS builder
ARG VARIANT
# Same default as the Makefile's TORCH_SPEC: the pin in pyproject.toml must accept it.
ARG TORCH_SPEC=torch==2.13.0
# Where torch comes from. Empty picks PyTorch's index for VARIANT: plain PyPI's Linux torch
# wheel is the multi-GB CUDA build, which the CPU image must not carry. Set it to use a mirror.
ARG TORCH_INDEX_URL=""
ARG CUDA_WHEEL_TAG=cu128
# torch goes in first and alone (as in the Makefile) so that the project install below finds
# its pin already satisfied and never swaps in PyPI's CUDA build. The index is set through the
# environment so the pip command itself stays the Makefile's. DL3013 cannot see that
# TORCH_SPEC is a pin (`torch==...`); tests/test_deploy.py checks it against pyproject.toml.
# hadolint ignore=DL3013
RUN python3.11 -m venv /opt/venv \
 && if [ -z "${TORCH_INDEX_URL}" ]; then \
      if [ "${VARIANT}" = "cuda" ]; then TORCH_INDEX_URL="https://download.pytorch.org/whl/${CUDA_WHEEL_TAG}"; \
      else TORCH_INDEX_URL="https://download.pytorch.org/whl/cpu"; fi; \
    fi \
 && PIP_INDEX_URL="${TORCH_INDEX_URL}" pip install --no-cache-dir "${TORCH_SPEC}"
WORKDIR /src
# Sources last, so editing code does not invalidate the torch layer.
COPY pyproject.toml README.md ./
COPY server/ server/
COPY sampler/ sampler/
COPY bench/ bench/
RUN pip install --no-cache-dir .

# ---- runtime ----

FROM base AS runtime
# A fixed numeric uid, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
# /cache is created and owned before VOLUME, so a fresh named volume inherits the ownership.
RUN groupadd --gid 10001 dgserve \
 && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin dgserve \
 && mkdir -p /cache \
 && chown dgserve:dgserve /cache
COPY --from=builder /opt/venv /opt/venv
WORKDIR /app
# The server reads its YAML from here: `--config configs/<name>.yaml` works as in a checkout.
COPY configs/ configs/
# Model cache (GGUF → safetensors conversion, tokenizer, hub downloads): a volume, so the
# about-a-minute first-start conversion happens once per volume, not once per container.
ENV DGSERVE_CACHE=/cache \
    HF_HOME=/cache/huggingface
VOLUME ["/cache"]
USER 10001:10001
EXPOSE 8000
# /health is liveness only (it answers while the model loads); the long start period covers a
# first-start conversion. Python's urllib, because the slim image has no curl.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10m --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
# SIGTERM starts the server's drain (shutdown_grace_s, 30 s by default): give `docker stop`
# a longer timeout (`-t 60`; compose sets stop_grace_period) or in-flight requests are cut.
STOPSIGNAL SIGTERM
CMD ["dgserve", "--config", "configs/default.yaml", "--host", "0.0.0.0", "--port", "8000"]
