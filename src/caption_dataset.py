"""Caption a whole dataset on a RunPod endpoint: the command of the ``dataset_client`` package."""
from __future__ import annotations

import sys

from dataset_client.cli import main

if __name__ == "__main__":
    sys.exit(main())
