# BLIP-2 captioning worker for RunPod serverless, with the model baked into the image.
#
#   docker build -t blip2-worker .                                    # transformers engine, fp16
#   docker build --build-arg BLIP_ENGINE=lavis -t blip2-worker:lavis .  # LAVIS engine
#   docker run --rm --gpus all blip2-worker        # captions ./test_input.json and exits
#
# Base image: NVIDIA's official CUDA runtime image, Ubuntu 22.04. Its tag scheme is
# <CUDA version>-runtime-ubuntu<release> (the nvidia/cuda image page lists the supported tags);
# 12.8.1-runtime-ubuntu22.04 is a current, widely used one. Pin it by digest
# (nvidia/cuda:12.8.1-runtime-ubuntu22.04@sha256:...) once CI has pulled it. Why this base:
# torch's CUDA wheels bring their own CUDA libraries, so "runtime" (not "devel") is enough; the
# image sets what the NVIDIA container toolkit reads to mount the host driver
# (NVIDIA_VISIBLE_DEVICES, NVIDIA_DRIVER_CAPABILITIES, NVIDIA_REQUIRE_CUDA). Ubuntu 22.04 ships
# Python 3.10, so Python 3.11 comes from the deadsnakes PPA, as in RunPod's own base images
# (runpod/base); those were not used: they add nginx, sshd, Jupyter, several Pythons and a
# /start.sh entry point that a serverless worker does not need.
#
# Build args:
#   BLIP_ENGINE      transformers (default): requirements.txt, and the model downloaded and
#                    converted to fp16 safetensors by builder/fetch_model.py (~8 GB in the image;
#                    the build needs ~25 GB free for the fp32 download it deletes).
#                    lavis: requirements-lavis.txt and the LAVIS checkpoints (prefetch).
#   BLIP_MODEL_REPO  Hub repo of the transformers engine's model (the default one is public). A
#                    gated or private repo needs HF_TOKEN: add
#                    --mount=type=secret,id=HF_TOKEN,env=HF_TOKEN to the fetch RUN and build with
#                    --secret id=HF_TOKEN; never a build arg or ENV (those stay in the image).

ARG BLIP_ENGINE=transformers
ARG BLIP_MODEL_REPO=Salesforce/blip2-opt-2.7b-coco

FROM nvidia/cuda:12.8.1-runtime-ubuntu22.04 AS build

ARG BLIP_ENGINE
ARG BLIP_MODEL_REPO

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
# torch==2.13.0 is requirements.txt's pin (tests/test_dockerfile.py checks they agree), the CUDA
# build from the default index; the LAVIS pins are read from requirements-lavis.txt as the
# Makefile does.
COPY requirements.txt requirements-lavis.txt ./
RUN case "$BLIP_ENGINE" in \
      transformers) pip install torch==2.13.0 && pip install -r requirements.txt ;; \
      lavis) pip install $(grep -E '^torch(vision)?==' requirements-lavis.txt) \
             && pip install -r requirements-lavis.txt ;; \
      *) echo "BLIP_ENGINE must be transformers or lavis, not '$BLIP_ENGINE'" >&2; exit 1 ;; \
    esac

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

# LAVIS engine: its checkpoints are fetched by src/engine_lavis.py into this user's default
# torch hub and Hugging Face caches, where the worker reads them. (This step needs src/, so for
# the LAVIS variant an edit of src/ fetches them again; the transformers variant does not.)
RUN if [ "$BLIP_ENGINE" = lavis ]; then python builder/fetch_model.py --engine lavis; fi

# Per-engine model setting. ENV cannot branch on a build arg, so each engine gets a one-line
# stage and the image is the one BLIP_ENGINE names (BuildKit builds only that one).
FROM build AS engine-transformers
ARG BLIP_MODEL_REPO
ENV BLIP_MODEL=/models/${BLIP_MODEL_REPO}

FROM build AS engine-lavis
# LAVIS's own caption_coco_opt2.7b (src/engine_lavis.py refuses any other real model).
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
