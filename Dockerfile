# The callout service image: `docker build -t callout .` (docker-compose.yml builds it for you).
#
# Two stages on the same pinned base. `build` installs the service into a virtualenv; the final
# stage copies only that virtualenv, so the source tree, pip's work files and any build tooling
# stay behind. Neither stage has a compiler: every compiled dependency (PyNaCl, cffi, orjson)
# must arrive as a wheel, and the build fails rather than compile one.
#
# Seeds are never baked in or passed as environment values: they are files mounted at run time
# (compose secrets under /run/secrets/), named by CALLOUT_*_SEED_FILE. Seed files must be mode
# 0600/0400 and owned by the uid the container runs as (10001 unless overridden); see
# the README's "Deploying" section, "Secrets".

FROM python:3.11.14-slim-bookworm AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /src
COPY requirements.lock pyproject.toml README.md ./
COPY callout ./callout

# requirements.lock pins the whole development environment, test tools included (pytest, mypy,
# hadolint...). It is used here as a *constraints* file: pip installs only what pyproject.toml's
# [project] dependencies need, transitively, and takes each version from the lock; packages
# that are only in the lock are never installed. The freeze check then fails the build if
# anything was installed that the lock does not pin, so the image cannot drift from the tested
# versions (tests/deploy checks the same closure against the lock without Docker).
# nkeys is published as a pure-Python sdist only, hence the one --no-binary exception.
RUN python -m venv /opt/callout \
    && /opt/callout/bin/pip install --constraint requirements.lock \
        --only-binary=:all: --no-binary=nkeys /src \
    && unpinned="$(/opt/callout/bin/pip freeze | grep -v '^callout @' \
        | grep -vxF -f requirements.lock || true)" \
    && if [ -n "$unpinned" ]; then \
        echo "installed but not pinned in requirements.lock: $unpinned" >&2; exit 1; \
    fi

FROM python:3.11.14-slim-bookworm

ENV PATH=/opt/callout/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# A fixed numeric uid: the seed files on the host must be owned by it (compose bind-mounts
# file secrets with their host owner and mode; the service refuses group/other-readable seeds).
RUN useradd --system --no-log-init --uid 10001 --user-group \
        --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin callout

COPY --from=build /opt/callout /opt/callout
# Two helpers from deploy/compose/: the healthcheck below, and the restore of a users backup
# (the README's "Deploying" section, "Back up and restore").
COPY deploy/compose/healthcheck.py /opt/callout/

USER 10001:10001

# Healthy while the process holds an established connection to one of its NATS servers
# (CALLOUT_NATS_URL). A stand-in until the service serves an HTTP health endpoint.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "/opt/callout/healthcheck.py"]

# SIGTERM (docker stop) makes the service stop taking requests, answer those in flight, exit 0.
ENTRYPOINT ["callout"]
CMD ["serve"]
