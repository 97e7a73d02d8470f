# One Chorus image: the orchestrator, the combiner and, for CPU hosts, the tritonserver bundled
# in nvidia-pytriton (Python backend), plus torch (CPU) to train the example and run TorchScript.
#
#   docker build -t chorus .
#
# BASE_IMAGE: an image with Python 3.11 built as a shared library (the official python images),
# or a Debian bookworm without Python (Debian's python3 and libpython3.11 are installed).
# TORCH_INDEX: where the CPU build of torch comes from (PyPI's is a multi-GB CUDA build); wheels
# put in docker/wheels/ are used first. A CA bundle for a TLS-intercepting proxy can be handed
# in as a build secret (never kept in the image): --secret id=ca,src=$SSL_CERT_FILE
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS base
# Debian's python3 where the base has none; the Python backend's stub links libpython
RUN if ! command -v python3 >/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv libpython3.11 \
        && rm -rf /var/lib/apt/lists/*; \
    fi

FROM base AS build
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN python3 -m venv /opt/chorus
COPY docker/wheels/ /wheels/
COPY pyproject.toml README.md /src/
COPY orchestrator /src/orchestrator
COPY combiner /src/combiner
COPY model_repository_templates /src/model_repository_templates
RUN --mount=type=secret,id=ca \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca SSL_CERT_FILE=/run/secrets/ca; fi; \
    /opt/chorus/bin/pip install --no-cache-dir --disable-pip-version-check --find-links /wheels \
        ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} '/src[demo]' \
    && find /opt/chorus -name __pycache__ -prune -exec rm -rf {} +

FROM base
RUN useradd --create-home --uid 1000 chorus && mkdir /deploy && chown chorus /deploy
COPY --from=build /opt/chorus /opt/chorus
COPY docker/chorus-plan /opt/chorus/bin/chorus-plan
ENV PATH=/opt/chorus/bin:$PATH PYTHONDONTWRITEBYTECODE=1
USER chorus
WORKDIR /home/chorus
EXPOSE 8000 8001 8002 8100 8101 8102
CMD ["chorus", "--help"]
