# Two commands matter: `make run` and `make test` (see README). Everything else is optional.
PY          ?= python3
VENV        := .venv
BIN         := $(VENV)/bin
TORCH       := torch==2.13.0
REQS        := requirements.txt requirements-test.txt
# The venv is reused as long as the requirements files are unchanged.
STAMP       := $(VENV)/.installed-$(shell cat $(REQS) | sha1sum | cut -c1-12)
# BLIP_ENGINE=lavis: its own venv (LAVIS pins transformers 4.25.1), same reuse rule. torch and
# torchvision are installed first, at the pins written in requirements-lavis.txt.
LAVIS_PY    ?= $(PY)
LAVIS_VENV  := .venv-lavis
LAVIS_BIN   := $(LAVIS_VENV)/bin
LAVIS_REQS  := requirements-lavis.txt
LAVIS_TORCH := $(shell grep -E '^torch(vision)?==' $(LAVIS_REQS))
LAVIS_STAMP := $(LAVIS_VENV)/.installed-$(shell cat $(LAVIS_REQS) | sha1sum | cut -c1-12)
# `make run BLIP_ENGINE=lavis` (or BLIP_ENGINE=lavis in the environment) runs in .venv-lavis.
ifeq ($(BLIP_ENGINE),lavis)
RUN_VENV    := venv-lavis
RUN_BIN     := $(LAVIS_BIN)
else
RUN_VENV    := venv
RUN_BIN     := $(BIN)
endif

.PHONY: venv venv-lavis run test test-main test-lavis test-gpu soak bench clean

$(STAMP): $(REQS)
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check $(TORCH)
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements.txt -r requirements-test.txt
	@rm -f $(VENV)/.installed-*
	@touch $@

venv: $(STAMP)

$(LAVIS_STAMP): $(LAVIS_REQS)
	@test -x $(LAVIS_BIN)/python || $(LAVIS_PY) -m venv $(LAVIS_VENV)
	$(LAVIS_BIN)/python -m pip install -q --disable-pip-version-check $(LAVIS_TORCH)
	$(LAVIS_BIN)/python -m pip install -q --disable-pip-version-check -r $(LAVIS_REQS)
	@rm -f $(LAVIS_VENV)/.installed-*
	@touch $@

venv-lavis: $(LAVIS_STAMP)

## make run: caption test_input.json with the configured model (BLIP_MODEL=tiny-random works offline)
run: $(RUN_VENV)
	$(RUN_BIN)/python src/handler.py

## make test: the whole test suite on CPU with the tiny random model (both engines)
test: test-main test-lavis

test-main: venv
	$(BIN)/python -m pytest -q

## make test-lavis: BLIP_ENGINE=lavis tests in .venv-lavis (tests/lavis, ignored by test-main)
test-lavis: venv-lavis
	$(LAVIS_BIN)/python -m pytest -q tests/lavis
	TEST_ENGINE=lavis $(LAVIS_BIN)/python -m pytest -q tests/test_e2e.py

## make soak: the long load/soak tests on the real local API (SOAK_SCALE=0.25 shortens them)
soak: venv
	$(BIN)/python -m pytest -q -m soak tests/test_soak.py

## make test-gpu: CUDA-only checks (on a GPU machine); make bench: the standard benchmark set
test-gpu: venv
	$(BIN)/python -m pytest -q -m gpu tests/test_gpu.py

bench: venv
	$(BIN)/python scripts/bench.py --mode load
	$(BIN)/python scripts/bench.py --mode engine --batch-sizes 1,8,32 --decoders fast,hf --compare-naive
	$(BIN)/python scripts/bench.py --mode concurrent --images 32
	$(BIN)/python scripts/bench.py --mode pipeline --images 256 --image-size 640x480 --batch-sizes 64
	$(BIN)/python scripts/bench.py --mode api --images 32

clean:
	rm -rf $(VENV) $(LAVIS_VENV) .pytest_cache .hypothesis
