# chat-api container image.
#
#   docker build -t chat-api .
#   docker run --rm -p 127.0.0.1:8000:8000 chat-api
#
# Stages: `python` (the base, with Python and the service's user), `build`
# (wheels of the project and every runtime dependency: `pip wheel .`),
# `venv` (those wheels installed into /opt/chat-api, offline) and the final
# `runtime`, which copies that venv and nothing else: no source tree, no
# wheels, no pip, no compiler. The install is a stage of its own rather than
# a step of `runtime` because a COPY of the wheels into the final stage would
# keep them in a layer even after they are deleted, and `RUN --mount` needs
# BuildKit, which not every `docker build` has (the legacy builder has not).
#
# BASE_IMAGE: any Debian-like image. The default, the official
# python:3.11-slim, already has Python 3.11. An image without Python (for
# instance a bare Debian bookworm made with debootstrap, as
# tests/test_image.py does) gets Debian's python3 (3.11 on bookworm),
# python3-venv and ca-certificates from apt, nothing more: every dependency
# has a manylinux wheel for x86_64 and arm64, so no compiler is needed. On a
# platform where one has no wheel, install build-essential and python3-dev
# with apt in the `build` stage (only there: it is thrown away).
#
# No secrets are baked in: settings come from the environment at run time
# (and .dockerignore keeps .env, .git, .venv and caches out of the context).

ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS python
# The same PATH as Docker's default when the base sets none (an image made by
# `docker import` has no environment at all).
ENV PATH=${PATH:-/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin} \
    LANG=C.UTF-8
RUN set -eu; \
    if ! command -v python3 >/dev/null 2>&1; then \
        export DEBIAN_FRONTEND=noninteractive; \
        apt-get update; \
        apt-get install -y --no-install-recommends python3 python3-venv ca-certificates; \
        apt-get clean; \
        rm -rf /var/lib/apt/lists/*; \
    fi; \
    python3 -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "chat-api needs Python >= 3.11")'; \
    useradd --system --uid 10001 --user-group --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin chat-api

FROM python AS build
# PEM certificates for pip to trust besides the system's, for a build behind
# a TLS-inspecting proxy: --build-arg BUILD_CA_CERTS="$(cat proxy-ca.crt)".
# Used in this stage only; the runtime image never sees them.
ARG BUILD_CA_CERTS=""
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY src ./src
# pip runs from a throw-away venv: Debian's python3 has no pip of its own.
RUN set -eu; \
    python3 -m venv /tmp/pip; \
    if [ -n "$BUILD_CA_CERTS" ]; then \
        cat /etc/ssl/certs/ca-certificates.crt > /tmp/ca.pem 2>/dev/null || true; \
        printf '%s\n' "$BUILD_CA_CERTS" >> /tmp/ca.pem; \
        export PIP_CERT=/tmp/ca.pem; \
    fi; \
    /tmp/pip/bin/pip wheel --no-cache-dir --disable-pip-version-check \
        --wheel-dir /wheels .

FROM python AS venv
COPY --from=build /wheels /wheels
RUN python3 -m venv /opt/chat-api \
    && /opt/chat-api/bin/pip install --no-cache-dir --disable-pip-version-check \
        --no-index --find-links /wheels chat-api \
    && /opt/chat-api/bin/pip uninstall --yes --quiet pip setuptools

FROM python AS runtime
COPY --from=venv /opt/chat-api /opt/chat-api
# HOST: the service defaults to 127.0.0.1, which no one outside the container
# could reach. PORT is read by the health check below too.
ENV PATH=/opt/chat-api/bin:${PATH} \
    HOST=0.0.0.0 \
    PORT=8000 \
    PYTHONUNBUFFERED=1
# An empty working directory: Config.load() reads ./.env if there is one, so
# a file can be mounted here; none is shipped.
WORKDIR /srv/chat-api
# Numeric, so Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
EXPOSE 8000
# No curl in slim images: Python's urllib, on the address and port the
# service listens on (a wildcard HOST is reached on loopback).
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["/opt/chat-api/bin/python", "-c", "import os, urllib.request; h = os.environ.get('HOST') or '0.0.0.0'; h = {'0.0.0.0': '127.0.0.1', '::': '::1'}.get(h, h); h = '[%s]' % h if ':' in h else h; urllib.request.urlopen('http://%s:%s/healthz' % (h, os.environ.get('PORT') or '8000'), timeout=2)"]
# Exec form: Python is PID 1 and gets SIGTERM itself. The service installs
# its own SIGTERM/SIGINT handlers (readiness false, 1001 to every client,
# exit 0), so the kernel's PID 1 rule (no default signal actions) does not
# bite, and it starts no child processes that an init would have to reap.
# `docker run --init` adds Docker's tini where one is wanted anyway.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/opt/chat-api/bin/chat-api"]
