# One image for every role of the sensor hub: router (Crossbar), storage, query, the device simulator and the
# one-shot secrets job. docker-compose.yml picks the role with the command; the command lines are the ones
# `make run` starts outside containers.
#
# Two stages: the build stage has a C compiler (bjdata is rebuilt from source, see below) and the runtime
# stage only receives the finished virtual environment, so the image carries no compiler.
#
# Needs BuildKit (docker buildx, or DOCKER_BUILDKIT=1 with an engine's built-in builder): the steps that
# download from PyPI take an optional build secret `ca`, a CA bundle to trust for TLS (a proxy that re-signs
# HTTPS), e.g.  docker build --secret id=ca,src=/etc/ssl/certs/ca-certificates.crt .
# A secret is mounted for one step only and is never part of a layer.
#
# PYTHON_IMAGE: any Debian-based image with Python 3.11, its venv module and apt (python:3.11-slim, or a
# bookworm with Debian's python3 and python3-venv).

ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS build

# Debian's own python3 keeps its C headers in python3-dev; python:3.11-slim has them already.
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && if [ ! -f "$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h" ]; then \
      apt-get install -y --no-install-recommends python3-dev; fi \
 && rm -rf /var/lib/apt/lists/*

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv

# Dependencies get a layer of their own, keyed on the pins only: editing the source does not reinstall them.
# The list comes from pyproject.toml itself (not a copy of it), installed under the same constraints.txt as
# `make run` uses; the project itself is installed in the runtime stage, after the source is copied.
WORKDIR /build
COPY pyproject.toml constraints.txt ./
RUN --mount=type=secret,id=ca \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
 && pip install "setuptools>=70" wheel \
 && python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
      > requirements.txt \
 && pip install -c constraints.txt -r requirements.txt

# Same cure as the Makefile: crossbar pulls bjdata as an sdist that builds against NumPy 1 in an isolated build
# environment and then fails its ABI check under NumPy 2 at every start. Rebuilt here against the installed
# NumPy; the build fails if importing it still prints anything.
RUN --mount=type=secret,id=ca \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
 && pip install --no-binary bjdata --no-build-isolation --no-deps --force-reinstall \
      "bjdata==$(python -c 'import importlib.metadata as m; print(m.version("bjdata"))')" \
 && out="$(python -c 'import bjdata' 2>&1)" \
 && if [ -n "$out" ]; then echo "bjdata still broken: $out" >&2; exit 1; fi

# ---------------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    IOT_CONFIG=/app/config.json

# A fixed uid/gid, so files in the named volumes keep their owner across image rebuilds.
RUN groupadd --system --gid 10001 sensorhub \
 && useradd --system --uid 10001 --gid sensorhub --create-home --home-dir /home/sensorhub \
      --shell /usr/sbin/nologin sensorhub

COPY --from=build /opt/venv /opt/venv

# The source, owned by root and read-only for the service user. .dockerignore keeps .venv, var/, caches,
# .git, tests and any .env out of the build context, so no local secret can land in a layer.
WORKDIR /app
COPY . /app

# Editable, as `make run` installs it: components.ops.router_config finds router/config.json and router/web next to
# the components package, so the package must be imported from /app and not from a copy in site-packages.
# The Crossbar worker (which loads components.wamp.router_auth) finds it through the editable finder as well.
RUN pip install --no-deps --no-build-isolation -c constraints.txt -e . \
 && python -m compileall -q components devices \
 && mkdir -p var/secrets var/run var/db var/spool \
 && chown -R sensorhub:sensorhub var \
 && chmod 700 var/secrets

# var/ is the only place the services write: secrets (tickets, device keys, bridge secret), run (the rendered
# router config and Crossbar's node files: key.priv, node.pid), db (SQLite), spool (device spools). Named
# volumes mounted there start as copies of these folders, owner and mode included, so the non-root user
# can write into them.
USER sensorhub

EXPOSE 8080

# No default role: docker-compose.yml (or `docker run IMAGE python -m components router`) names it.
CMD ["python", "-m", "components", "--help"]
