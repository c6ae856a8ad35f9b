"""Caption a whole dataset on a RunPod endpoint: fan-out, retries, resume, dataset outputs.

    RUNPOD_API_KEY=... python src/caption_dataset.py ~/datasets/dogs --endpoint ID \\
        --out ~/datasets/dogs/metadata.jsonl --format hf
    RUNPOD_API_KEY=... python src/caption_dataset.py urls.txt --endpoint ID --out captions.jsonl

A client apart from the service: it splits the work into /run jobs, keeps at most
``--max-in-flight`` of them running on the endpoint (whose autoscaled workers do the work),
polls them, resubmits what was lost and writes each image's caption or error exactly once.
It runs on the official runpod SDK (``runpod.Endpoint``; ``RUNPOD_ENDPOINT_BASE_URL`` moves the
base URL, which is how the tests point it at a local simulator). The key comes from
``RUNPOD_API_KEY`` only: never a flag, never logged. It imports only torch-free worker modules
(schema, config, errors, deliver, inputs' decoding, caption_folder's file walk); pre-resizing
imports ``preprocess`` (and so torch) lazily, for its ``resize``. It never loads a model.

The code is the ``dataset_client`` package; its ``__init__`` lists the modules.
"""
from __future__ import annotations

import sys

from dataset_client.cli import main

if __name__ == "__main__":
    sys.exit(main())
