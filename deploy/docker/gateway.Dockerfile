# image: personagate/gateway
# The gateway (SIP, WebRTC, admin API, routing) on a CPU, and nothing of the worker's: EXTRAS=gateway
# (pyproject.toml's extras), so no torch, no moshi and no test tools. Workers, the CPU demo's included, run
# worker.Dockerfile's image.
#   cp ../shared/vendor/pjproject-2.16.tar.gz deploy/pjsua2/   # the checksummed pjproject source (docs/deploy.md)
#   docker build -f deploy/docker/gateway.Dockerfile -t personagate/gateway:0.1.0 .
# The install is the README's, `make install`, into /app/.venv, in layers that change from least to most often:
#   1. pjsua2, built from pjproject's release archive by deploy/pjsua2/build.sh (512 calls a process, TLS against
#      the image's OpenSSL 3, SRTP, the gateway's SIP guard), the archive checked against its SHA-256. The archive
#      must be in the build context: the image never falls back to cloning.
#   2. `make deps`: every Python dependency from the hashed lock, requirements/gateway.lock (--require-hashes);
#      only the Makefile and requirements/ are copied for it, so a change of the code reuses this layer.
#   3. the source, then `make install`: the package itself (--no-deps, editable from /app) and the cached pjsua2.
# System packages are named without versions, on purpose: docs/deploy.md#system-packages (apt policy).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG EXTRAS=gateway
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends make build-essential swig libssl-dev ca-certificates \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
# pjsua2 into build.sh's cache (its key: the source, deploy/pjsua2, the Python ABI, compiler and OpenSSL), where
# `make install` below finds it.
COPY deploy/pjsua2 deploy/pjsua2
RUN test -f deploy/pjsua2/pjproject-2.16.tar.gz \
    || { echo "deploy/pjsua2/pjproject-2.16.tar.gz is missing: copy it from ../shared/vendor (docs/deploy.md#images)" >&2; exit 1; } \
    && deploy/pjsua2/build.sh --python python3 --no-install \
    && rm deploy/pjsua2/pjproject-2.16.tar.gz
COPY Makefile ./
COPY requirements requirements
RUN make deps PYTHON=python3 EXTRAS="${EXTRAS}"
COPY pyproject.toml README.md ./
COPY agent_runtime agent_runtime
COPY gateway gateway
COPY personagate_bench personagate_bench
COPY personagate personagate
COPY personagate_common personagate_common
RUN make install PYTHON=python3 EXTRAS="${EXTRAS}" \
    && rm -rf /root/.cache build \
    && find /app/.venv -name '__pycache__' -prune -exec rm -rf {} +

# No system package is added at run time: the wheels bring their libraries (soundfile its libsndfile), and pjsua2
# needs only what the base has (libstdc++, OpenSSL 3, libuuid).
FROM ${PYTHON_IMAGE}
RUN groupadd --gid 10001 personagate \
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
