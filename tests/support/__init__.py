"""Test support: one module per kind of helper. Fixtures stay in tests/conftest.py, as thin
wrappers; test modules import from here, never from each other.

- ``web``: the local HTTP server (``LocalServer``), route factories (``body``, ``status``,
  ``fail_then``, ``delay``, ``drip``, ``drip_headers``, ``redirect``, ``reset``, ``huge``),
  ``allow_private_urls``, ``count_bytes_returned``, and ``data_uri`` for inline sources.
- ``images``: real encoded images (``picture``, ``jpeg``, ``png``, the hostile and special
  cases, ``photo``) and ``distinct_images``.
- ``zips``: real zips (``make_zip``) and damaged ones (``patch_entry``, ``corrupt_entry``,
  ``zip_bomb``, ...), and ``five_member_zip``.
- ``worker``: the worker as a process (``run_handler``, ``ApiServer``, ``worker_env``,
  ``api_output``, ``proc_figures``), ``REPO`` and ``FAST``.
- ``checks``: judging a job's answer (``outcomes``, ``outcome_problems``) and ``within``.
- ``load``: the load mix (``LoadMix``, ``MixJob``, ``run_load``, ``load_problems``, ...).
- ``dockerfile``: the Dockerfile as Docker reads it, and the CUDA flavour facts.
- ``runpod_sim``: a local RunPod serverless endpoint (``RunPodSim``: the client API and the
  worker side) and ``WorkerProcess``, a worker in production mode taking jobs from it.

Modules whose helpers have short names that tests also use as locals are imported as
modules: ``web.body(pics.png(2))`` (``from support import images as pics``, as ``images`` is a
local name in several tests), ``load.LoadMix``, ``checks.within``. The rest is imported by
name: ``make_zip``, ``ApiServer``, ``FAST``.
"""
