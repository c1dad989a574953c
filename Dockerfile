# GPU image of llm-service: vLLM's maintained CUDA image at the pinned vLLM version, our package on top.
#
#   docker build -t llm-service:1.0.0 .
#
# The default base tag is built for the CUDA 13 runtime (NVIDIA driver 580 or newer). Hosts with a
# CUDA 12.x driver build on the cu129 variant of the same release instead:
#
#   docker build --build-arg VLLM_TAG=v0.32.0-cu129 -t llm-service:1.0.0 .
#
# The CPU image for laptops is Dockerfile.cpu.
ARG VLLM_TAG=v0.32.0
FROM vllm/vllm-openai:${VLLM_TAG}

# HF_HOME/HF_HUB_CACHE: the deployment guide mounts the model cache at /root/.cache/huggingface/hub.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/root/.cache/huggingface \
    HF_HUB_CACHE=/root/.cache/huggingface/hub \
    APP_HOST=0.0.0.0 \
    APP_PORT=8002

# A non-root user (uid 10001, group 0 so that OpenShift-style random uids can write too). It keeps
# the guide's cache path: /root is made traversable and the cache directory is owned by the user.
RUN useradd --no-log-init --uid 10001 --gid 0 --create-home --home-dir /home/llm --shell /bin/bash llm \
    && mkdir -p /root/.cache/huggingface/hub /app \
    && chmod 0711 /root \
    && chown -R 10001:0 /root/.cache /app \
    && chmod -R g+rwX /root/.cache /app

WORKDIR /app

# Installing with the `gpu` extra lets pip's resolver see vLLM's own pins while vllm==0.32.0 is
# already satisfied by the base image, so vLLM and torch are not reinstalled: the layer holds only
# our package and its few dependencies. PIP_BREAK_SYSTEM_PACKAGES: the base image uses the system Python.
COPY --chown=10001:0 pyproject.toml README.md ./
COPY --chown=10001:0 llm_service ./llm_service
# DL3013: this installs the project itself; its dependency pins live in pyproject.toml.
# hadolint ignore=DL3013
RUN PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --no-cache-dir --disable-pip-version-check ".[gpu]" \
    && python3 -c "import llm_service, vllm; print('vllm', vllm.__version__)"

# The model download script, for pre-filling a cache volume with this image (see DEPLOYMENT.md).
COPY --chown=10001:0 scripts/model-download.sh /usr/local/bin/model-download

USER 10001
EXPOSE 8002

# Docker's health = ready to serve: /health/ready answers 503 until the preloaded models are loaded.
# start_period covers a first start that still has to download the weights.
HEALTHCHECK --interval=30s --timeout=10s --start-period=600s --retries=3 \
    CMD ["python3", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8002/health/ready', timeout=8).status != 200)"]

# The base image's entrypoint is `vllm serve`; this image runs our service instead.
ENTRYPOINT []
CMD ["python3", "-m", "llm_service"]
