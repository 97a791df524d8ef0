# syntax=docker/dockerfile:1
#
# sd-endpoint GPU image: SageMaker runs it as `docker run IMAGE serve`, a
# workstation as `docker run --gpus all -p 8080:8080 IMAGE`.
# Build (BuildKit, for the RUN --mount steps):  docker build -t sd-endpoint .
#
# Version pairing (keep these together; change them in one commit):
#   torch 2.14.1 (+cu130) / torchvision 0.29.1 / xformers 0.0.35 / CUDA 13.0 base
# - torch 2.14.1 is a CUDA 13.0 build, so the base image is CUDA 13.0 + cuDNN.
# - xformers 0.0.34+ is built against PyTorch's stable ABI, and 0.0.35 declares
#   `torch>=2.10`: one binary serves later torch releases. PyPI carries only its
#   CUDA 12.x build, which does not load beside a CUDA 13 torch (PyPI torch is
#   CUDA 13 since 2.12), so all three wheels come from PyTorch's cu130 index,
#   where the xformers build matches the CUDA of the torch it sits next to.
# - Moving torch: check that PyTorch's index for the new CUDA carries this
#   xformers (or a newer one) before changing the base image and the pins.

ARG CUDA_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04

# uv is used only to fetch a pinned CPython build (python-build-standalone); it
# is mounted for one RUN and is not part of the final image.
FROM ghcr.io/astral-sh/uv:0.13.9 AS uv

# Docker Hub rate-limits anonymous pulls (CodeBuild shares IPs, so it hits the
# limit often): buildspec.yml logs in to Docker Hub when credentials are set,
# or pass --build-arg CUDA_IMAGE=<ECR pull-through cache path to the same tag>.
FROM ${CUDA_IMAGE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Runtime libraries OpenCV (pulled in by ControlNet preprocessors) loads at
# import time; without them `import cv2` fails only inside the image.
# Pins: libgl1 has had no update in noble; glib is pinned to its upstream
# release with the Ubuntu revision left free so security fixes still apply
# (the archive drops superseded revisions, an exact pin would stop building).
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        libgl1=1.7.0-1build1 \
        libglib2.0-0t64=2.80.0-* \
    && rm -rf /var/lib/apt/lists/*

# Python 3.11 from python-build-standalone, exact patch release. Ubuntu 24.04
# ships 3.12 only and 22.04's python3.11 is a 3.11.0 release candidate with no
# public updates, so the interpreter does not come from apt. The venv's pip is
# the one bundled with this CPython release (ensurepip), so it is pinned too.
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_NO_CACHE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN --mount=from=uv,source=/uv,target=/usr/local/bin/uv \
    uv python install --no-bin 3.11.18 \
    && "$(uv python find 3.11.18)" -m venv "$VIRTUAL_ENV" \
    && python -c "import sys; assert sys.version_info[:3] == (3, 11, 18), sys.version"

# Layer 1: the CUDA stack (several GB). Changes only when these pins change.
# The constraints file keeps every later pip step from swapping torch out.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130
RUN printf '%s\n' torch==2.14.1 torchvision==0.29.1 xformers==0.0.35 > /opt/constraints.txt \
    && pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" -r /opt/constraints.txt
ENV PIP_CONSTRAINT=/opt/constraints.txt

# Layer 2: the project's other dependencies, read from pyproject.toml alone so
# that code changes do not reinstall them.
RUN --mount=type=bind,source=pyproject.toml,target=/tmp/deps/pyproject.toml \
    python -c "import tomllib; p = tomllib.load(open('/tmp/deps/pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['gpu']))" > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# Layer 3: the package itself (serve, pipelines, model_cache, container with its
# bundled configs). The context is mounted, not copied, so no source layer is
# kept; symlinked tokenizer files are stored as regular files in the wheel.
RUN --mount=type=bind,target=/usr/src/sd-endpoint,rw \
    pip install --no-cache-dir "/usr/src/sd-endpoint[gpu]" \
    && python -c "import importlib.metadata as m; v = {d: m.version(d) for d in ('torch', 'torchvision', 'xformers')}; assert v['torch'].startswith('2.14.1') and v['torchvision'].startswith('0.29.1') and v['xformers'].startswith('0.0.35'), v"

# Offline by design: nothing is fetched from a model hub at run time.
# MODEL_STORE defaults to where SageMaker mounts model artefacts; set it to
# s3://bucket/prefix/ (or mount a folder there) to serve other models.
ENV HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MODEL_STORE=/opt/ml/model

WORKDIR /opt/program
COPY --chmod=755 container/serve /opt/program/serve

EXPOSE 8080

# SageMaker ignores HEALTHCHECK; `docker run` users get a status from /ping.
# The start period covers the worker's first model load.
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/ping' % os.environ.get('SAGEMAKER_BIND_TO_PORT', '8080'), timeout=4)"]

# Runs as root: SageMaker starts containers as root and owns /opt/ml.
# Exec form, and container/serve `exec`s the Python console script, so the
# server is PID 1 and receives SageMaker's SIGTERM directly. With no argument
# (plain `docker run IMAGE`) it serves as well.
ENTRYPOINT ["/opt/program/serve"]
