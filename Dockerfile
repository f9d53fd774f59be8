# One image for the API and the build workers (docker-compose.yml picks the command).
# CPU build by default; for GPU workers: docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 .
FROM python:3.11-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PLURISTEER_HOME=/data \
    ARTIFACT_DIR=/artifacts

WORKDIR /app
# torch first, from the index that matches the hardware; the project's range accepts it.
RUN pip install torch --index-url "${TORCH_INDEX}"
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
