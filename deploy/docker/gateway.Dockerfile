# image: personagate/gateway
# The gateway (SIP, WebRTC, admin API, routing) on a CPU, and the CPU demo's tiny-model worker.
#   docker build -f deploy/docker/gateway.Dockerfile -t personagate/gateway:0.1.0 .
# The install is the README's: `make install` (torch first, the CPU build; then moshi==0.2.13 with --no-deps;
# then this package), into /app/.venv. Then pjsua2 is built from source (deploy/pjsua2/build.sh) for 512 calls
# a process instead of the pjsua2-python wheel's 4; --build-arg PJSUA2_FROM_SOURCE=0 keeps the wheel.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG PJSUA2_FROM_SOURCE=1
ARG PJPROJECT_TAG=2.15.1
ARG TORCH_CPU_PIP_OPTS="--index-url https://download.pytorch.org/whl/cpu"
RUN apt-get update \
    && apt-get install -y --no-install-recommends make build-essential swig git ca-certificates \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY Makefile pyproject.toml README.md ./
COPY agent_runtime agent_runtime
COPY gateway gateway
COPY deploy/pjsua2 deploy/pjsua2
RUN make install PYTHON=python3 TORCH_CPU_PIP_OPTS="${TORCH_CPU_PIP_OPTS}"
RUN if [ "$PJSUA2_FROM_SOURCE" = "1" ]; then \
        git clone --depth 1 --branch "$PJPROJECT_TAG" https://github.com/pjsip/pjproject.git /tmp/pjproject \
        && PYTHON=/app/.venv/bin/python deploy/pjsua2/build.sh /tmp/pjproject --install \
        && rm -rf /tmp/pjproject; \
    fi \
    && find /app/.venv -name '__pycache__' -prune -exec rm -rf {} +

FROM ${PYTHON_IMAGE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends libsndfile1 \
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
EXPOSE 8080/tcp 5060/udp
# Exec form: personagate is PID 1 and gets SIGTERM itself (drain), SIGINT stops at once.
ENTRYPOINT ["/app/.venv/bin/personagate"]
CMD ["gateway"]
