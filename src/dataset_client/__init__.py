"""The dataset client: the package behind ``src/caption_dataset.py``, a tool apart from the
service (the worker's modules never import it). The modules, in the order the work flows:

- ``cli``: the flags, the checks before anything is sent, the bar, Ctrl-C, the summary and the
  exit codes;
- ``sources``: each SOURCE (folder, URL list, s3:// prefix, zip URL) listed as the run's items;
- ``outfiles``: the output formats, appended job by job, and what an earlier run left (resume);
- ``fanout``: the run: jobs built and packed, at most ``--max-in-flight`` of them on the
  endpoint, each image's outcome recorded once;
- ``packing``: a local file as a ``data:`` URI, pre-resized with the worker's own code, and the
  /run body measured;
- ``endpoint``: one job submitted and followed over the runpod SDK (back-off, cancelling);
- ``outcomes``: what a job's final state means for its images;
- ``work``: the records the others hand each other.

Imports go one way, with no cycle: ``cli`` -> ``fanout`` -> the other parts -> ``work``, which
imports nothing of the project (``cli`` also takes what it needs from the parts directly).
"""
