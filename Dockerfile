# syntax=docker/dockerfile:1
# The project image. Ray head and worker pods (KubeRay or the cluster launcher), RayJob drivers and
# the MLflow server all run this one image, so every process sees the same code and library versions.
#
#   docker build -t eiw-flow:0.1.0 .
#
# It installs the project as the README does (Python 3.11), with torch and torchvision pinned exactly
# as in pyproject.toml. Those are PyPI's default Linux wheels, which bundle CUDA 13.0 (torch.version.cuda):
# the same image runs CPU and NVIDIA GPU pods, and the GPU driver comes from the node. GPU nodes need
# an NVIDIA driver >= 580.65.06 (R580, CUDA 13.0's minimum; NVIDIA's CUDA 13.0 release notes);
# NVIDIA_REQUIRE_CUDA below makes the NVIDIA container runtime refuse a GPU container on an older one
# instead of torch failing later with "driver too old".
#
# Layers, slowest-changing first: system packages, torch, the other dependencies (read from
# pyproject.toml alone), then the code, installed without dependencies. A code change rebuilds only
# the last layers; a dependency change in pyproject.toml reinstalls the dependencies.
FROM python:3.11-slim-bookworm

# wget: KubeRay's readiness/liveness probes call it; curl and procps: health checks and
# infra/local/*.sh; tini: reaps Ray's orphaned worker processes when it runs as PID 1.
# gcc, g++, libc6-dev: torch.compile (Inductor's C++ kernels, Triton's launcher stubs) compiles at run
# time; the slim image has no compiler and --no-install-recommends would leave out the libc headers.
RUN apt-get update \
    && apt-get install -y --no-install-recommends wget curl procps tini gcc g++ libc6-dev \
    && rm -rf /var/lib/apt/lists/*

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NVIDIA_REQUIRE_CUDA="cuda>=13.0"

# Uid 1000 is the `ray` user of KubeRay's examples; shared volumes are usually provisioned for it.
RUN useradd --create-home --uid 1000 --shell /bin/bash ray
WORKDIR /app

# The biggest layer first, so code changes do not re-download it (pins as in pyproject.toml).
RUN pip install torch==2.14.1 torchvision==0.29.1

# The dependencies, from pyproject.toml only (no code yet), plus the drivers for the team MLflow
# server: PostgreSQL backend store (psycopg2); boto3 for the S3 artifact store is a pinned dependency.
COPY pyproject.toml ./
RUN python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt "psycopg2-binary>=2.9" \
    && rm /tmp/requirements.txt

COPY README.md ./
COPY flows ./flows
COPY data_prep ./data_prep
COPY pipeline ./pipeline
COPY tune ./tune
COPY configs ./configs
RUN pip install --no-deps -e .

COPY infra ./infra

# Lineage (pipeline/lineage.py): the image has no .git, so runs read the commit it was built from
# here; EIW_IMAGE names the image in every run's tags. Last, so a new commit rebuilds only this layer:
#   docker build --build-arg GIT_COMMIT=$(git rev-parse HEAD) \
#     --build-arg GIT_DIRTY=$(git diff --quiet HEAD && echo false || echo true) \
#     --build-arg IMAGE=eiw-flow:0.1.0 -t eiw-flow:0.1.0 .
ARG GIT_COMMIT=""
ARG GIT_DIRTY=unknown
ARG IMAGE=""
ENV EIW_GIT_COMMIT=$GIT_COMMIT \
    EIW_GIT_DIRTY=$GIT_DIRTY \
    EIW_IMAGE=$IMAGE

# The code stays root-owned and read-only for the runtime user.
USER ray

ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["python", "-m", "pipeline.train", "--help"]
