# One image for the twin (`mgtwin serve`) and the emulator (`mgtwin emulate`); see docker-compose.yml.
FROM python:3.11.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/mgtwin
COPY pyproject.toml README.md LICENSE ./
COPY twin ./twin
COPY emulators ./emulators
RUN pip install . \
    && useradd --system --uid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin mgtwin
COPY deploy/emulator ./deploy/emulator

# Unprivileged; the run folders and scratch files go to /tmp.
USER mgtwin
WORKDIR /tmp
# /healthz and /metrics (loopback inside the container unless MGTWIN_HEALTH__HOST says otherwise).
EXPOSE 9108
CMD ["mgtwin", "serve"]
