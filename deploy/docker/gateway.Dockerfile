# image: personagate/gateway
# The gateway (SIP, WebRTC, admin API, routing) on a CPU, and nothing of the worker's: EXTRAS=gateway
# (pyproject.toml's extras), so no torch and no moshi. Workers, the CPU demo's included, run worker.Dockerfile's image.
#   docker build -f deploy/docker/gateway.Dockerfile -t personagate/gateway:0.1.0 .
# The install is the README's: `make install` (this package, then pjsua2 built from pjproject's source by
# deploy/pjsua2/build.sh: 512 calls a process, TLS against the image's OpenSSL 3, SRTP, the gateway's SIP guard),
# into /app/.venv. The source is the pinned upstream tag, its commit checked; a release archive put in
# deploy/pjsua2/ first (ignored by git, e.g. from ../shared/vendor) is used instead, checked against its SHA-256:
# no network needed for it.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG EXTRAS=gateway
RUN apt-get update \
    && apt-get install -y --no-install-recommends make build-essential swig libssl-dev git ca-certificates \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY Makefile pyproject.toml README.md ./
# pjsua2 first, into build.sh's cache (its key: the source, deploy/pjsua2, the Python ABI, compiler and OpenSSL):
# this layer, the longest, is reused until one of those changes, and `make install` below finds the build there.
COPY deploy/pjsua2 deploy/pjsua2
RUN deploy/pjsua2/build.sh --python python3 --no-install
COPY agent_runtime agent_runtime
COPY gateway gateway
COPY personagate_bench personagate_bench
COPY personagate personagate
COPY personagate_common personagate_common
RUN make install PYTHON=python3 EXTRAS="${EXTRAS}" \
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
    HOME=/tmp
WORKDIR /app
USER 10001:10001
EXPOSE 8080/tcp 5060/udp
# Exec form: personagate is PID 1 and gets SIGTERM itself (drain), SIGINT stops at once.
ENTRYPOINT ["/app/.venv/bin/personagate"]
CMD ["gateway"]
