"""Test support packages that are bigger than a testlib section (e.g. ``runpod_sim``)."""
