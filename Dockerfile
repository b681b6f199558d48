# zimage: the server (`zimage serve`) and the Ray image (KubeRay runs `ray start` in it). See docs/ray.md.
#   docker build -t zimage .
#   docker run --gpus all -p 8000:8000 -v zimage-models:/models -v zimage-data:/data zimage
# The CUDA runtime base and PyTorch's CUDA wheel are build arguments: pick the pair your driver supports.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/zimage \
    PATH=/opt/zimage/bin:$PATH

# python3-venv: an environment of our own (the system Python is externally managed); wget: KubeRay's probes and
# the health check below. Not pinned: the base image fixes the release, and its packages' versions move with
# security updates.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv wget ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/zimage \
    && groupadd --gid 10001 zimage \
    && useradd --create-home --uid 10001 --gid 10001 --shell /bin/bash zimage \
    && mkdir -p /models /data \
    && chown zimage:zimage /models /data

# As the README says: PyTorch's CUDA build first, then zimage with its extras.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"
COPY pyproject.toml README.md /src/
COPY zimage /src/zimage
RUN pip install "/src[server,ray]"

# 10001: Ubuntu's images already have a user 1000 (ubuntu).
USER 10001:10001
WORKDIR /home/zimage
# The model cache is a volume: the weights (~33 GB) are downloaded once (`zimage download`) or mounted, never
# baked into the image. Jobs and images go to /data unless --database-url / --images-url point elsewhere.
ENV HF_HOME=/models/huggingface \
    MODELSCOPE_CACHE=/models/modelscope \
    ZIMAGE_CACHE=/models/zimage \
    ZIMAGE_DATA_DIR=/data
VOLUME ["/models", "/data"]
EXPOSE 8000

# /health is 200 once the model is loaded and warm; loading and compiling take minutes on a cold start.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["wget", "-q", "-O", "/dev/null", "http://127.0.0.1:8000/health"]

ENTRYPOINT ["zimage"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
