"""The dataset client: the package behind ``src/caption_dataset.py``, a tool apart from the
service (the worker's modules never import it)."""
