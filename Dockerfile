# One image for the API and the build workers (docker-compose.yml picks the command).
# torch is pinned as the Makefile pins it (TORCH_VERSION) and chosen as scripts/install_torch.sh chooses it:
# the CPU build from PyTorch's CPU wheel index by default; for GPU workers, the default package index's
# build, which is the CUDA one: docker build --build-arg TORCH_INDEX= .
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PLURISTEER_HOME=/data \
    ARTIFACT_DIR=/artifacts

WORKDIR /app
# torch first, from the index that matches the hardware; the project's range accepts it.
RUN if [ -n "${TORCH_INDEX}" ]; then pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"; \
    else pip install "torch==${TORCH_VERSION}"; fi
COPY . /app
# Editable: migrations/ and the demo's fixture are read from the source tree.
RUN pip install -e . \
    && useradd --create-home --uid 1000 pluristeer \
    && mkdir -p /data /artifacts \
    && chown pluristeer /data /artifacts
USER pluristeer

EXPOSE 8000
# No HEALTHCHECK here: the API and the workers are checked differently (docker-compose.yml has one each).
CMD ["pluristeer", "serve", "--host", "0.0.0.0", "--port", "8000", "--workers", "2"]
