# The image the Helm chart runs: `epserve` (the project, torch, the SDK) as a non-root user.
#   GPU nodes (default):  docker build -t REGISTRY/epserve:0.1.0 .
#   CPU only:             docker build --build-arg BASE_IMAGE=ubuntu:24.04 \
#                           --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu -t REGISTRY/epserve:0.1.0-cpu .
ARG BASE_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.13.0
# PyPI's Linux torch wheels are CUDA builds; the CPU index has the small CPU-only ones
ARG TORCH_INDEX_URL=https://pypi.org/simple

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 VIRTUAL_ENV=/opt/epserve PATH=/opt/epserve/bin:$PATH

# gcc and python3-dev: Triton compiles its kernel launcher with the system C compiler at run time
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv "$VIRTUAL_ENV"
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY services services
COPY kernels kernels
COPY load_tests load_tests
COPY sdk sdk
RUN pip install . ./sdk && rm -rf /src

# uid 10001 = the chart's runAsUser; HOME and the caches live on the pod's writable /cache volume
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /cache --shell /usr/sbin/nologin epserve \
    && mkdir /cache && chown 10001:10001 /cache
USER 10001:10001
WORKDIR /cache
ENV HOME=/cache EPSERVE_CACHE=/cache/epserve TRITON_CACHE_DIR=/cache/triton
EXPOSE 50051 50061 50071
ENTRYPOINT ["epserve"]
CMD ["--help"]
