# syntax=docker/dockerfile:1
# One image for every Mercato process; the command picks it:
#   mercato serve gateway|profile|retrieval|ranking   (the four services)
#   mercato train ... / mercato promote ...           (training jobs)
#   mlflow server ...                                 (the tracking server)
#   torchrun ... -m training ...                      (distributed training)
#
# Build and push (see docs/operations.md):
#   docker build -t REGISTRY/mercato:VERSION .
#   docker push REGISTRY/mercato:VERSION
# Without a Docker engine or registry (CI): `make image` builds it with podman on a Debian
# base made by mmdebstrap (PYTHON_IMAGE=that base) and runs each service (scripts/image.sh).
#
# Runs as a non-root user (uid 10001) with a read-only root filesystem: everything that
# writes goes to $MERCATO_HOME (/var/lib/mercato) and $HOME (/tmp), which Kubernetes
# mounts as emptyDir or persistent volumes.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------- build stage
FROM ${PYTHON_IMAGE} AS build

# CPU-only PyTorch: the CPU wheel index keeps the multi-GB CUDA build out of the image.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# MLflow's PostgreSQL backend store driver (the tracking server runs from this image).
ARG PSYCOPG2_VERSION=2.9.13

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

# Compilers only here, for any dependency without a wheel; the final stage has none.
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# A CPU torch wheel put in .image-wheels/ (make image does, from this machine's disk) is
# used as is; otherwise the CPU wheel index. Its dependencies come from PyPI.
COPY .image-wheels/ /tmp/wheels/
RUN if ls /tmp/wheels/torch-"${TORCH_VERSION}"+cpu-*.whl >/dev/null 2>&1; then \
      pip install /tmp/wheels/torch-"${TORCH_VERSION}"+cpu-*.whl; \
    else \
      pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"; \
    fi \
 && rm -rf /tmp/wheels

# Dependencies first (cached until pyproject.toml changes), then the project itself.
WORKDIR /src
COPY pyproject.toml ./
RUN python -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt "psycopg2-binary==${PSYCOPG2_VERSION}" \
 && python -c 'import torch; assert not torch.cuda.is_available() and "+cpu" in torch.__version__, torch.__version__'
COPY . .
# Byte-compile the venv; torch ships test helpers written for newer Pythons (a 3.12
# generics syntax file), which 3.11 cannot compile and never imports.
RUN pip install --no-deps . \
 && python -m compileall -q -x 'torch/testing/_internal/py3(1[2-9]|[2-9][0-9])_' /opt/venv/lib

# -------------------------------------------------------------------------- final stage
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="mercato" \
      org.opencontainers.image.description="Mercato: real-time retail personalization over gRPC" \
      org.opencontainers.image.licenses="Apache-2.0"

# OpenMP runtime for torch / FAISS / implicit (a library, not a build tool).
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 mercato \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
      --home-dir /var/lib/mercato --shell /usr/sbin/nologin mercato \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/mercato

COPY --from=build /opt/venv /opt/venv
# The default offer catalogue, where Kubernetes mounts the ConfigMap mercato-offers (which
# then replaces it): `mercato serve ranking` works from the image alone too.
COPY config/offers.yaml /etc/mercato/offers/offers.yaml

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MERCATO_HOME=/var/lib/mercato \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    MPLCONFIGDIR=/tmp/matplotlib \
    MLFLOW_DISABLE_TELEMETRY=true \
    MERCATO_RANKING_OFFERS_FILE=/etc/mercato/offers/offers.yaml \
    OMP_NUM_THREADS=1 \
    OPENBLAS_NUM_THREADS=1 \
    MKL_NUM_THREADS=1

# Numeric uid so that Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
WORKDIR /var/lib/mercato
EXPOSE 50051 50052 50053 50054 9101 9102 9103 9104 5000

ENTRYPOINT ["mercato"]
CMD ["--help"]
