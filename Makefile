# boothd — `make demo` and `make test` work on a fresh machine with Python 3.11 and pip.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch first and exactly this version: it is the CPU wheel on local disk; letting
# any other package pull `torch` would download a multi-GB CUDA build.
TORCH := torch==2.13.0
TEST_TIMEOUT ?= 900

.PHONY: all install test lint demo bench bench-quick faults lock clean catalogue

all: test

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt pip setuptools
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -c constraints.txt --no-build-isolation -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check service events gpu_runner tests bench
	$(VENV)/bin/mypy

test: $(STAMP) lint
	$(PY) -m pytest -q -p no:cacheprovider

demo: $(STAMP)
	$(PY) -m service.demo

BENCHES := bench/event_store.py bench/train.py bench/generate.py bench/api.py

bench: $(STAMP)
	for b in $(BENCHES); do echo "== $$b"; $(PY) $$b || exit 1; done

bench-quick: $(STAMP)
	for b in $(BENCHES); do echo "== $$b"; $(PY) $$b --quick || exit 1; done

faults: $(STAMP)
	BOOTHD_FAULT_SEEDS=10 BOOTHD_FAULT_BURST=500 BOOTHD_FUZZ_EXAMPLES=3000 $(PY) -m pytest -q -p no:cacheprovider tests/faults tests/fuzz

catalogue: $(STAMP)
	$(PY) -m events.catalogue --write README.md

lock: $(STAMP)
	( echo '# Exact versions that `make` and CI install (pip -c). Regenerate with `make lock`.'; \
	  $(PY) -m pip freeze --all | grep -v -E '^(torch|boothd|-e )' ; echo '$(TORCH)' ) > constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
