"""Fixtures of the BLIP_ENGINE=lavis tests. They run in .venv-lavis (`make test-lavis`);
pytest.ini keeps the main suite (`make test-main`, other venv) from collecting this folder."""
import pytest

import engines
from lavis_testlib import tiny_cfg


def pytest_configure(config):
    # Deprecation notices LAVIS's own imports trigger (torch.jit.script, fairscale's amp).
    for line in ("ignore:`torch.jit.script` is deprecated:FutureWarning",
                 "ignore::FutureWarning:fairscale"):
        config.addinivalue_line("filterwarnings", line)


@pytest.fixture(scope="session")
def lavis_engine():
    """The tiny LAVIS model through the worker's own entry point (load + warm-up)."""
    return engines.load_engine(tiny_cfg())
