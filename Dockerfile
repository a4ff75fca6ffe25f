# syntax=docker/dockerfile:1
# The Zen server as a container image: `python -m app` (the master) as PID 1.
#
#   docker build -t zen-server .            (or: podman build ...)
#   docker run -p 1060:1060 zen-server
#
# BASE_IMAGE is any Debian-like image with python3 (>= 3.11) and its venv
# module.  The default is one of the two Pythons the test suite runs on:
# 3.13, not the host's 3.11, because an image is deployed and then left
# running, so it should start on the newest tested Python (security fixes
# until 2029 against 2027 for 3.11), and python:3.13-slim is Debian 13
# trixie, the same release and Python minor as the trixie root filesystem
# the tests run the unit, integration and system suites on and build and
# run this image on.  python:3.11-slim is the other tested base (the
# container test also builds on Debian bookworm's 3.11):
#   docker build --build-arg BASE_IMAGE=python:3.11-slim .
# No registry is reachable in the tests, so they pass local Debian images.
# A private CA bundle for pip, when the network needs one, comes in as a
# build secret and never lands in a layer:
#   docker build --secret id=pip_cert,src=/etc/ssl/certs/ca-certificates.crt .
ARG BASE_IMAGE=python:3.13-slim

FROM ${BASE_IMAGE} AS build
# The image ships the compiled build (setup.py: the hot modules compiled by
# mypyc), so this stage, and only this one, gets a C compiler, plus the
# Python headers where the base lacks them (Debian's python3; the official
# images have theirs).  The final stage copies the venv and no compiler.
# Without apt (or a reachable archive) the install still succeeds, as pure
# Python, and says so; ZEN_PURE_PYTHON=1 as a build argument asks for that.
# hadolint ignore=DL3008
RUN if command -v apt-get >/dev/null; then \
      headers=$(python3 -c 'import os, sysconfig; print("" if os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")) else "python3-dev")'); \
      { apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev $headers; } \
        || echo "no C compiler: the build falls back to pure Python"; \
      rm -rf /var/lib/apt/lists/*; \
    fi
# `python3 -m venv` works on both bases (Debian's has no `python`); the
# venv then provides `python` for CMD and HEALTHCHECK.
RUN python3 -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md setup.py ./
COPY app ./app
# An index other than PyPI, when the build host uses one (empty: PyPI).
ARG PIP_INDEX_URL_OVERRIDE=""
ARG ZEN_PURE_PYTHON=""
# The last command prints which build was installed (PYTHONSAFEPATH: the
# installed package, not the sources in this directory).
RUN --mount=type=secret,id=pip_cert,required=false \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
    && /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check \
       ${PIP_INDEX_URL_OVERRIDE:+--index-url "$PIP_INDEX_URL_OVERRIDE"} . \
    && PYTHONSAFEPATH=1 /opt/venv/bin/python -m app --version

FROM ${BASE_IMAGE}
RUN useradd --system --uid 10001 --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin zen
COPY --from=build /opt/venv /opt/venv
# HOST: listen on every interface of the container's network namespace.
# LOG_FORMAT: JSON lines on stdout for the engine's log driver.
# The bytecode pip compiled is kept (every health probe starts a Python);
# nothing new is written at run time (the root filesystem may be read-only).
ENV PATH=/opt/venv/bin:$PATH \
    HOST=0.0.0.0 \
    PORT=1060 \
    LOG_FORMAT=json \
    PYTHONDONTWRITEBYTECODE=1
# No source tree and no .env here: the installed package is the program.
WORKDIR /srv
# Numeric, so Kubernetes runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
EXPOSE 1060
# SIGTERM is the graceful drain (GRACEFUL_TIMEOUT, 25 s by default): give
# `docker stop` a --time above it (-t 35) or the engine kills at 10 s.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=5s --start-period=5s --retries=3 CMD ["python", "-m", "app", "check"]
CMD ["python", "-m", "app"]
