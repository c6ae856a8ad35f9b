# Two commands matter: `make run` and `make test` (see README). Everything else is optional.
PY          ?= python3
VENV        := .venv
BIN         := $(VENV)/bin
TORCH       := torch==2.13.0
REQS        := requirements.txt requirements-test.txt
# The venv is reused as long as the requirements files are unchanged.
STAMP       := $(VENV)/.installed-$(shell cat $(REQS) | sha1sum | cut -c1-12)

.PHONY: venv run test test-fast soak bench clean

$(STAMP): $(REQS)
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check $(TORCH)
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements.txt -r requirements-test.txt
	@rm -f $(VENV)/.installed-*
	@touch $@

venv: $(STAMP)

## make run: caption test_input.json with the configured model (BLIP_MODEL=tiny-random works offline)
run: venv
	$(BIN)/python src/handler.py

## make test: the whole test suite on CPU with the tiny random model
test: venv
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
