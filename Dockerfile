# BLIP-2 captioning worker for RunPod serverless, with the model baked into the image.
#
#   docker build -t blip2-worker .                                    # transformers engine, fp16
#   docker build --build-arg BLIP_ENGINE=lavis -t blip2-worker:lavis .  # LAVIS engine
#   docker build --build-arg CUDA_FLAVOR=cu130 -t blip2-worker:cu130 .  # CUDA 13.0 torch
#   docker run --rm --gpus all blip2-worker        # captions ./test_input.json and exits
#
# CUDA flavour: the build arg CUDA_FLAVOR is the one place that names it; everything else
# follows from it. It picks the base image (the cuda-<flavour> stages below are the table of
# known flavours: FROM cannot compute a tag, but it can name a stage) and PyTorch's wheel index
# (https://download.pytorch.org/whl/<flavour>) that torch, and torchvision for LAVIS, come from.
# Two RUN checks stop the build when the base image's CUDA_VERSION or the installed torch's
# torch.version.cuda is not the flavour's. .runpod/hub.json's allowedCudaVersions and the
# README's list of hosts follow the default; tests/test_dockerfile.py checks that they agree.
#   cu126 (default)  torch's CUDA 12.6 build. Drivers are backward compatible, so it runs on every
#                    host whose driver supports CUDA 12.6 or newer (R560+): RunPod hosts reporting
#                    12.6 to 13.0. Its kernels cover sm_50 to sm_90 (Maxwell to Hopper: every GPU
#                    of hub.json's pools; Ada, sm_89, runs the sm_86 ones), not Blackwell.
#   cu130            torch's CUDA 13.0 build (sm_75 to sm_120, Blackwell included): only hosts
#                    whose driver supports 13.0 (R580+).
# Why cu126 by default: torch 2.13 and 2.14 are built for CUDA 12.6, 13.0 and 13.2 only (PyTorch
# dropped its 12.8 build in 2.12), and 12.6 is the one that runs on the most hosts.
# The wheel comes from PyTorch's index for every flavour, also cu130 (which the default index
# serves for torch 2.13.0): the flavour is then the one named here, not whichever CUDA build a
# later release makes the default index's.
#
# Base image: NVIDIA's official CUDA image in its smallest ("base") flavour, Ubuntu 22.04. Its
# tag scheme is <CUDA version>-base-ubuntu<release> (the nvidia/cuda image page lists the
# supported tags). Pin it by digest (nvidia/cuda:12.6.3-base-ubuntu22.04@sha256:...) once CI
# has pulled it. Why "base" (not "runtime" or "devel"): torch's CUDA wheels bring their own CUDA
# libraries (cuBLAS, cuDNN, NCCL, ... as pip packages), so the runtime image's copies would be
# dead weight in every cold pull. What the image still needs from the base: the variables the
# NVIDIA container toolkit reads (NVIDIA_VISIBLE_DEVICES and NVIDIA_DRIVER_CAPABILITIES, so
# that it mounts the host's driver, libcuda included, into the container; NVIDIA_REQUIRE_CUDA,
# cuda>=<the image's CUDA version>, so that it refuses to start the container on a host whose
# driver is too old, apart from the older driver branches the image lists as exceptions:
# failing there, at start, instead of a worker whose CUDA does not initialise) and the Ubuntu
# userland. Ubuntu 22.04 ships Python 3.10, so Python 3.11 comes from the deadsnakes PPA, as in
# RunPod's own base images (runpod/base); those were not used: they add nginx, sshd, Jupyter,
# several Pythons and a /start.sh entry point that a serverless worker does not need.
#
# Build args:
#   CUDA_FLAVOR      cu126 (default) or cu130, see above.
#   BLIP_ENGINE      transformers (default): requirements.txt, and the model downloaded and
#                    converted to fp16 safetensors by builder/fetch_model.py (~8 GB in the image;
#                    the build needs ~25 GB free for the fp32 download it deletes).
#                    lavis: requirements-lavis.txt and the LAVIS checkpoints (prefetch).
#   BLIP_MODEL_REPO  Hub repo of the transformers engine's model (the default one is public). A
#                    gated or private repo needs HF_TOKEN: add
#                    --mount=type=secret,id=HF_TOKEN,env=HF_TOKEN to the fetch RUN and build with
#                    --secret id=HF_TOKEN; never a build arg or ENV (those stay in the image).

ARG CUDA_FLAVOR=cu126
ARG BLIP_ENGINE=transformers
ARG BLIP_MODEL_REPO=Salesforce/blip2-opt-2.7b-coco

# The table of CUDA flavours: one stage per flavour, named cuda-<CUDA_FLAVOR> (BuildKit builds
# only the stages the final image needs). A flavour without a stage fails at the FROM below:
# there is no image named cuda-<flavour>.
FROM nvidia/cuda:12.6.3-base-ubuntu22.04 AS cuda-cu126
FROM nvidia/cuda:13.0.2-base-ubuntu22.04 AS cuda-cu130

FROM cuda-${CUDA_FLAVOR} AS build

ARG CUDA_FLAVOR
ARG BLIP_ENGINE
ARG BLIP_MODEL_REPO

# First, that the table's row is right: the base image's CUDA_VERSION (set by nvidia/cuda, e.g.
# 12.6.3) is the flavour's (cu126).
RUN test "cu$(echo "$CUDA_VERSION" | cut -d. -f1,2 | tr -d .)" = "$CUDA_FLAVOR" \
 || { echo "CUDA_FLAVOR=$CUDA_FLAVOR but its base image has CUDA $CUDA_VERSION:" \
           "fix the cuda-$CUDA_FLAVOR stage" >&2; exit 1; }

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Python 3.11 in a virtual environment (/opt/venv, first on PATH: `python` is 3.11);
# software-properties-common is only needed to add the PPA.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates software-properties-common \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
 && apt-get purge -y --auto-remove software-properties-common \
 && rm -rf /var/lib/apt/lists/* \
 && python3.11 -m venv /opt/venv

WORKDIR /app

# Dependencies, torch first at the pinned version (never an unpinned torch resolved by pip):
# torch==2.13.0 is requirements.txt's pin (tests/test_dockerfile.py checks they agree), the
# CUDA_FLAVOR build from PyTorch's index (2.13.0+cu126 satisfies the pin, so the requirements
# install keeps it); the LAVIS pins are read from requirements-lavis.txt as the Makefile does.
# Then the check that the installed torch is built for the flavour's CUDA (torch.version.cuda,
# e.g. 12.6, needs no GPU).
COPY requirements.txt requirements-lavis.txt ./
RUN case "$BLIP_ENGINE" in \
      transformers) pip install --index-url https://download.pytorch.org/whl/${CUDA_FLAVOR} \
                      torch==2.13.0 \
                    && pip install -r requirements.txt ;; \
      lavis) pip install --index-url https://download.pytorch.org/whl/${CUDA_FLAVOR} \
               $(grep -E '^torch(vision)?==' requirements-lavis.txt) \
             && pip install -r requirements-lavis.txt ;; \
      *) echo "BLIP_ENGINE must be transformers or lavis, not '$BLIP_ENGINE'" >&2; exit 1 ;; \
    esac
RUN torch_cuda=$(python -c "import torch; print(torch.version.cuda)") \
 && test "cu$(echo "$torch_cuda" | tr -d .)" = "$CUDA_FLAVOR" \
 || { echo "CUDA_FLAVOR=$CUDA_FLAVOR but torch is built for CUDA $torch_cuda" >&2; exit 1; }

# The worker runs as an unprivileged user, and the models are downloaded as that user, so the
# caches it reads at run time are its own and no chown copies gigabytes into another layer.
# (The GPU device nodes the container toolkit mounts are usable by any user.)
RUN useradd --create-home --uid 1000 worker && mkdir -p /models && chown worker:worker /models
USER worker

# transformers engine: download (fp32) + convert (fp16) + delete the download, in ONE layer so
# the image holds only the fp16 model. HF_HOME points at a scratch dir removed in the same
# layer, so no hub cache lands in the image. Only builder/ is copied first, so editing src/
# does not download the model again.
COPY builder/ builder/
RUN if [ "$BLIP_ENGINE" = transformers ]; then \
      HF_HOME=/tmp/hf-build python builder/fetch_model.py \
        --model "$BLIP_MODEL_REPO" --out "/models/$BLIP_MODEL_REPO" \
      && rm -rf /tmp/hf-build; \
    fi

COPY src/ src/
COPY test_input.json ./

# LAVIS engine: its checkpoints are fetched by src/engines/lavis_checkpoints.py into this user's
# default torch hub and Hugging Face caches, where the worker reads them. (This step needs src/,
# so for the LAVIS variant an edit of src/ fetches them again; the transformers variant does not.)
RUN if [ "$BLIP_ENGINE" = lavis ]; then python builder/fetch_model.py --engine lavis; fi

# Per-engine model setting. ENV cannot branch on a build arg, so each engine gets a one-line
# stage and the image is the one BLIP_ENGINE names (BuildKit builds only that one).
FROM build AS engine-transformers
ARG BLIP_MODEL_REPO
ENV BLIP_MODEL=/models/${BLIP_MODEL_REPO}

FROM build AS engine-lavis
# LAVIS's own caption_coco_opt2.7b (src/engines/lavis_engine.py refuses any other real model).
ENV BLIP_MODEL=caption_coco_opt2.7b

FROM engine-${BLIP_ENGINE}
ARG BLIP_ENGINE
# Offline at run time: everything is in the image (TRANSFORMERS_OFFLINE for LAVIS's
# transformers 4.25.1, which predates HF_HUB_OFFLINE). BLIP_DEVICE=cuda: a GPU image whose GPU
# is missing or broken exits with a clear error instead of captioning on the CPU.
ENV BLIP_ENGINE=${BLIP_ENGINE} \
    BLIP_DEVICE=cuda \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1
CMD ["python", "-u", "src/handler.py"]
