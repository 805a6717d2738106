# syntax=docker/dockerfile:1
# One image for every cosmoforge process on a cluster: the operator, the dispatcher, generator
# workers, post-processing Jobs and the embedded model server (`cosmo <command>`).
#   docker build -t cosmoforge:0.1.0 .
#   docker build --build-arg EXTRAS=operator,postprocess,embedded,training -t cosmoforge:0.1.0-train .
ARG PYTHON_VERSION=3.11

# --- build: compilers, the locked dependency set, generated gRPC code ------------------------
FROM python:${PYTHON_VERSION}-slim-bookworm AS build
ARG EXTRAS=operator,postprocess,embedded
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    # llama.cpp for the embedded model: portable (no -march=native), the nodes' CPUs differ.
    CMAKE_ARGS="-DGGML_NATIVE=OFF"
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY protos ./protos
COPY cosmoforge ./cosmoforge
RUN pip install -c constraints.txt -e ".[${EXTRAS}]" \
 # gRPC code is generated at build time: pods run with a read-only root filesystem.
 && python -m cosmoforge.protogen \
 && python -m compileall -q cosmoforge \
 && cosmo --help > /dev/null

# --- run: no compilers, no root ---------------------------------------------------------------
FROM python:${PYTHON_VERSION}-slim-bookworm
RUN groupadd --gid 10001 cosmo \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin cosmo
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    HF_HOME=/tmp/hf
WORKDIR /app
USER 10001:10001
ENTRYPOINT ["cosmo"]
CMD ["--help"]
