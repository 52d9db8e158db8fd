# image: personagate/worker
# The worker: PersonaPlex-7B on CUDA (the weights are mounted at run time, never baked in); with the build arguments
# below, the CPU image the CPU demo's tiny-model worker runs (no CUDA libraries, a fraction of the size).
#   docker build -f deploy/docker/worker.Dockerfile -t personagate/worker:0.1.0 .
#   docker build -f deploy/docker/worker.Dockerfile -t personagate/worker:0.1.0-cpu \
#       --build-arg BASE_IMAGE=ubuntu:22.04 --build-arg TORCH_CPU_PIP_OPTS="--index-url https://download.pytorch.org/whl/cpu" .
# The install is the README's: `make install` (torch first; then moshi==0.2.13 with --no-deps; then this package),
# into /app/.venv. The build machine needs no GPU: without nvidia-smi the Makefile installs torch with
# TORCH_CPU_PIP_OPTS, and with none (the default) takes torch as pip finds it (PyPI's Linux wheel is the CUDA
# build) and says so in a warning. The worker's side only (EXTRAS=worker: no aiortc; PJSUA2=none: no pjsua2, both
# the gateway's). A GPU node needs the NVIDIA driver and container toolkit (GPU operator).
# BASE_IMAGE: the CUDA runtime, or for the CPU image the Ubuntu it is built on (the same Python 3.11 from apt).
ARG BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04

FROM ${BASE_IMAGE} AS build
ARG TORCH_CPU_PIP_OPTS=""
RUN apt-get update \
    && apt-get install -y --no-install-recommends make python3.11 python3.11-venv python3.11-dev ca-certificates \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY Makefile pyproject.toml README.md ./
COPY agent_runtime agent_runtime
COPY gateway gateway
COPY personagate_bench personagate_bench
COPY personagate personagate
COPY personagate_common personagate_common
RUN make install PYTHON=python3.11 EXTRAS=worker PJSUA2=none TORCH_CPU_PIP_OPTS="${TORCH_CPU_PIP_OPTS}" \
    && rm -rf /root/.cache \
    && find /app/.venv -name '__pycache__' -prune -exec rm -rf {} +

FROM ${BASE_IMAGE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 libsndfile1 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 personagate \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin personagate
COPY --from=build /app /app
ENV PATH=/app/.venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    NO_TORCH_COMPILE=1 \
    HOME=/tmp
WORKDIR /app
USER 10001:10001
EXPOSE 8765/tcp
ENTRYPOINT ["/app/.venv/bin/personagate"]
CMD ["worker"]
