# image: personagate/worker
# The worker: PersonaPlex-7B on CUDA (the weights are mounted at run time, never baked in); with TORCH_CPU_PIP_OPTS,
# the CPU image the CPU demo's tiny-model worker runs (torch's CPU build: no CUDA libraries, a fraction of the size).
#   docker build -f deploy/docker/worker.Dockerfile -t personagate/worker:0.1.0 .
#   docker build -f deploy/docker/worker.Dockerfile -t personagate/worker:0.1.0-cpu \
#       --build-arg TORCH_CPU_PIP_OPTS="--index-url https://download.pytorch.org/whl/cpu" .
# A slim Debian base, not a CUDA one: PyPI's CUDA build of torch depends on NVIDIA's nvidia-* wheels (the CUDA
# runtime, cuBLAS, cuDNN, cuFFT, cuSPARSE, NCCL, nvJitLink...), which pip installs into the venv and torch loads from
# there; a CUDA base image would be a second copy of the same libraries (gigabytes). A GPU node adds only the driver
# (libcuda.so and nvidia-smi, mounted into the container by the NVIDIA container toolkit / GPU operator), at least
# the version the CUDA of TORCH_VERSION's wheel needs (docs/deploy.md#images).
# The install is the README's, `make install`, into /app/.venv, the worker's side only (EXTRAS=worker: no aiortc;
# PJSUA2=none: no pjsua2; no test tools), in two layers:
#   1. `make deps`: requirements/worker.lock with --require-hashes, then torch==TORCH_VERSION (the build machine needs
#      no GPU: without nvidia-smi the Makefile takes torch with TORCH_CPU_PIP_OPTS; with none, the default, PyPI's
#      CUDA build, and says so in a warning), then moshi==0.2.13 --no-deps from its hashed lock. Only the Makefile
#      and requirements/ are copied for it, so a change of the code reuses this layer (and its torch download).
#   2. the source, then `make install`: the package itself (--no-deps, editable from /app).
# System packages are named without versions, on purpose: docs/deploy.md#system-packages (apt policy).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_CPU_PIP_OPTS=""
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# make, and a C compiler for the package's one extension (gateway/audio/_polyphase.c)
RUN apt-get update \
    && apt-get install -y --no-install-recommends make gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY Makefile ./
COPY requirements requirements
RUN make deps PYTHON=python3 EXTRAS=worker PJSUA2=none TORCH_CPU_PIP_OPTS="${TORCH_CPU_PIP_OPTS}"
COPY pyproject.toml README.md ./
COPY agent_runtime agent_runtime
COPY gateway gateway
COPY personagate_bench personagate_bench
COPY personagate personagate
COPY personagate_common personagate_common
RUN make install PYTHON=python3 EXTRAS=worker PJSUA2=none TORCH_CPU_PIP_OPTS="${TORCH_CPU_PIP_OPTS}" \
    && rm -rf /root/.cache build \
    && find /app/.venv -name '__pycache__' -prune -exec rm -rf {} +

# No system package is added at run time: the wheels bring their libraries (torch its CUDA ones as nvidia-* wheels,
# soundfile its libsndfile).
FROM ${PYTHON_IMAGE}
RUN groupadd --gid 10001 personagate \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin personagate
COPY --from=build /app /app
# NVIDIA_DRIVER_CAPABILITIES: what the container toolkit mounts from the driver (compute: libcuda; utility:
# nvidia-smi), as the CUDA base images set it; which GPUs is the device plugin's (NVIDIA_VISIBLE_DEVICES, or CDI).
ENV PATH=/app/.venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    NO_TORCH_COMPILE=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    HOME=/tmp
WORKDIR /app
USER 10001:10001
EXPOSE 8765/tcp
ENTRYPOINT ["/app/.venv/bin/personagate"]
CMD ["worker"]
