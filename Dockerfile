# One image for the twin (`mgtwin serve`) and the emulator (`mgtwin emulate`); see docker-compose.yml.
FROM python:3.11.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NUMBA_CACHE_DIR=/var/cache/mgtwin/numba \
    NUMBA_CPU_NAME=generic

WORKDIR /opt/mgtwin
COPY pyproject.toml README.md LICENSE ./
COPY twin ./twin
COPY emulators ./emulators
RUN pip install . \
    && useradd --system --uid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin mgtwin \
    && mkdir -p /var/cache/mgtwin/numba && chown mgtwin /var/cache/mgtwin/numba
COPY deploy/emulator ./deploy/emulator

# Unprivileged; the run folders and scratch files go to /tmp.
USER mgtwin
WORKDIR /tmp
# Compile the filters' kernels (numba) into the image: a short emulated run through the twin.
# For a generic x86-64 (NUMBA_CPU_NAME), or numba would compile them again on any other CPU;
# the cache folder must stay writable (numba reads only a cache it could write).
RUN mgtwin emulate --scenario small --duration 10m --pack-level --out /tmp/warm-up > /dev/null \
    && mgtwin replay /tmp/warm-up > /dev/null \
    && rm -rf /tmp/warm-up
# /healthz and /metrics (loopback inside the container unless MGTWIN_HEALTH__HOST says otherwise).
EXPOSE 9108
CMD ["mgtwin", "serve"]
