# syntax=docker/dockerfile:1
# cosmoforge images, one per role, each with only what its commands need (skaffold builds the
# three targets; the chart names them in `image`, `postprocessImage` and `trainerImage`):
#   runtime      the operator, the dispatcher, generator workers, the embedded model server
#   postprocess  dedup, decontamination (and its workers), clustering, tokenization Jobs
#   trainer      train and evaluate Jobs: CUDA PyTorch, nanotron (training) and lighteval
#   docker build --target runtime -t cosmoforge:0.1.0 .
#   docker build --target postprocess -t cosmoforge-postprocess:0.1.0 .
#   docker build --target trainer -t cosmoforge-trainer:0.1.0 .
ARG PYTHON_VERSION=3.11
# The trainer's base: PyTorch's own CUDA image, at the torch version of constraints.txt.
ARG TORCH_IMAGE=pytorch/pytorch:2.13.0-cuda12.8-cudnn9

# --- source: compilers and the code every build stage installs --------------------------------
FROM python:${PYTHON_VERSION}-slim-bookworm AS source
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY protos ./protos
COPY cosmoforge ./cosmoforge

# --- runtime build: NATS, gRPC, the inference clients, llama.cpp ------------------------------
FROM source AS build-runtime
# Runtime extras only: `dev` (linters, test servers, offline manifest validators) stays out.
ARG EXTRAS=operator,embedded
# llama.cpp for the embedded model: portable (no -march=native), the nodes' CPUs differ.
ENV CMAKE_ARGS="-DGGML_NATIVE=OFF"
RUN pip install -c constraints.txt -e ".[${EXTRAS}]" \
 # gRPC code is generated at build time: pods run with a read-only root filesystem.
 && python -m cosmoforge.services.protogen \
 && python -m compileall -q cosmoforge \
 && cosmo --help > /dev/null

# --- post-processing build: datatrove, spaCy, faiss, a CPU-only torch -------------------------
FROM source AS build-postprocess
ARG EXTRAS=postprocess,clustering
# These Jobs run on CPU nodes: PyTorch's CPU wheels, not gigabytes of CUDA libraries.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install -c constraints.txt --extra-index-url "${TORCH_INDEX}" -e ".[${EXTRAS}]" \
 && python -m compileall -q cosmoforge \
 && cosmo --help > /dev/null

# --- trainer build: nanotron and lighteval, each in its own environment -----------------------
FROM ${TORCH_IMAGE}-devel AS build-trainer
ARG EXTRAS=training
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY protos ./protos
COPY cosmoforge ./cosmoforge
# nanotron's environment is the base image's Python with its CUDA torch: `torchrun` starts
# `cosmoforge.training.nanotron_launch` there. nanotron 0.2 is the release that imports; its
# models need flash-attn, compiled against this image's CUDA. cosmoforge is on its path as
# source (a .pth file): installing it would pull lighteval, whose pins conflict with nanotron's.
RUN pip install "nanotron==0.2" "datatrove[io]==0.9.0" s3fs PyYAML \
 && pip install --no-build-isolation flash-attn \
 && echo /app > "$(python -c 'import site; print(site.getsitepackages()[0])')/cosmoforge.pth" \
 # What torchrun starts must import here, without cosmo's own dependencies.
 && python -c "import nanotron.config, cosmoforge.training.nanotron_launch"
# `cosmo train` / `cosmo evaluate` (lighteval) in a virtual environment over the same torch.
# The training Job's `prepare` and `convert-checkpoint` steps and the evaluation Job run here.
RUN python -m venv --system-site-packages /opt/venv \
 && /opt/venv/bin/pip install -c constraints.txt -e ".[${EXTRAS}]" \
 && /opt/venv/bin/python -m compileall -q cosmoforge \
 && /opt/venv/bin/cosmo convert-checkpoint --help > /dev/null \
 && /opt/venv/bin/python -m cosmoforge.training.nanotron_launch prepare --help > /dev/null

# --- the images: no compilers, no root ------------------------------------------------------
FROM python:${PYTHON_VERSION}-slim-bookworm AS slim
RUN groupadd --gid 10001 cosmo \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin cosmo
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    HF_HOME=/tmp/hf
WORKDIR /app
ENTRYPOINT ["cosmo"]
CMD ["--help"]

FROM slim AS postprocess
COPY --from=build-postprocess /opt/venv /opt/venv
COPY --from=build-postprocess /app /app
USER 10001:10001

FROM ${TORCH_IMAGE}-runtime AS trainer
RUN groupadd --gid 10001 cosmo \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin cosmo
COPY --from=build-trainer /opt/conda /opt/conda
COPY --from=build-trainer /opt/venv /opt/venv
COPY --from=build-trainer /app /app
# `cosmo` and `python` from the lighteval environment; the training Job starts torchrun with
# the base interpreter, the one that has nanotron (COSMO_NANOTRON_PYTHON, see training/job.py).
ENV PATH=/opt/venv/bin:/opt/conda/bin:$PATH \
    COSMO_NANOTRON_PYTHON=/opt/conda/bin/python \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    HF_HOME=/tmp/hf
WORKDIR /app
USER 10001:10001
ENTRYPOINT ["cosmo"]
CMD ["--help"]

# Last, so that a plain `docker build .` makes the runtime image, as before.
FROM slim AS runtime
COPY --from=build-runtime /opt/venv /opt/venv
COPY --from=build-runtime /app /app
USER 10001:10001
