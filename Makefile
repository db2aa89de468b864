# The two commands of the README: `make test` and `make demo`. Both create .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO ?= demo-output
JSRT ?= ../shared/data/jsrt
PAPER ?= paper-output
WEIGHTS ?= imagenet
PROTOCOLS ?= kfold
PYTEST_ARGS ?=
# The suite in two processes of one thread each (tiny models run no faster on two threads; two files at once do):
# about 5 min instead of 7 min 45 s on 2 cores. WORKERS=1 runs it in one process.
WORKERS ?= 2

.PHONY: test demo paper venv lint clean

venv: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Reinstall only when the packaging metadata changes; the install is editable, so code edits need none.
$(STAMP): setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test,plots,hf,dicom,txv,study,track]'
	touch $(STAMP)

test: $(STAMP)
	$(if $(filter-out 1,$(WORKERS)),OMP_NUM_THREADS=1) $(BIN)/python -m pytest -q \
		$(if $(filter-out 1,$(WORKERS)),-n $(WORKERS) --dist loadfile) $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/resmtnet demo --out $(DEMO)

# The paper's reproduction: every backbone the tables need, extracted once, then Tables 1-4.
# Online: the ImageNet weights download on first use. Offline: WEIGHTS=none (random init; the tables say so).
# PROTOCOLS=kfold,insample,contaminated puts the paper's numbers beside held-out and training-set scores.
paper: $(STAMP)
	$(BIN)/resmtnet paper --data $(JSRT) --out $(PAPER) --weights $(WEIGHTS) --protocols $(PROTOCOLS) --overwrite

lint: $(STAMP)
	$(BIN)/python -m pip install -q flake8
	$(BIN)/python -m flake8

clean:
	rm -rf $(VENV) $(DEMO) build *.egg-info .pytest_cache
