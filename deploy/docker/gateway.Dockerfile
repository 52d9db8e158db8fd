# image: personagate/gateway
# The gateway (SIP, WebRTC, admin API, routing) on a CPU, and the CPU demo's tiny-model worker: EXTRAS=gateway,worker
# (pyproject.toml's extras). --build-arg EXTRAS=gateway makes a gateway-only image, without torch or moshi.
#   docker build -f deploy/docker/gateway.Dockerfile -t personagate/gateway:0.1.0 .
# The install is the README's: `make install` (torch first, the CPU build; then moshi==0.2.13 with --no-deps;
# then this package; then pjsua2 built from pjproject's source by deploy/pjsua2/build.sh: 512 calls a process,
# TLS against the image's OpenSSL 3, SRTP, the gateway's SIP guard), into /app/.venv. The source is the pinned
# upstream tag, its commit checked; a release archive put in deploy/pjsua2/ first (ignored by git, e.g. from
# ../shared/vendor) is used instead, checked against its SHA-256: no network needed for it.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_CPU_PIP_OPTS="--index-url https://download.pytorch.org/whl/cpu"
ARG EXTRAS=gateway,worker
RUN apt-get update \
    && apt-get install -y --no-install-recommends make build-essential swig libssl-dev git ca-certificates \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY Makefile pyproject.toml README.md ./
COPY agent_runtime agent_runtime
COPY gateway gateway
COPY personagate_bench personagate_bench
COPY personagate personagate
COPY personagate_common personagate_common
COPY deploy/pjsua2 deploy/pjsua2
RUN make install PYTHON=python3 EXTRAS="${EXTRAS}" TORCH_CPU_PIP_OPTS="${TORCH_CPU_PIP_OPTS}" \
    && rm -rf /root/.cache \
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
