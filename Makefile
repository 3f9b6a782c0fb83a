# ndm-seq: the commands a newcomer needs. Every target creates its own environment.
#
#   make test      lint (ruff) + format check + the default test suite (< 10 min on 2 cores)
#   make test-latest  the same in .venv-latest, installed with the newest releases
#                  pyproject.toml allows instead of the tested ones of constraints.txt
#   make test-all  the same plus the slow end-to-end tests (pytest marker `slow`)
#   make demo      the main job on the embedded default corpus (see README)
#   make bench     the benchmarks under benchmarks/
#   make format    apply ruff's formatter and autofixes

PYTHON ?= python3
VENV   ?= .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# torch is installed first and pinned: on machines that keep the CPU wheel of
# this release on disk, pip takes it in seconds, whereas an unpinned `torch`
# would pull a multi-GB CUDA build. Elsewhere the pin is an ordinary PyPI
# install; if this release does not exist for the platform, fall back to the
# newest torch. Override with e.g. `make test TORCH_SPEC='torch==2.5.1'`.
TORCH_SPEC ?= torch==2.13.0
EXTRAS     ?= dev,chitchat,analysis,tensorboard
# Installs are reproducible: every other package comes at the version tested, from
# constraints.txt (its torch line equals TORCH_SPEC). `CONSTRAINTS=` (empty) lifts the
# pins: the newest releases pyproject.toml allows, as `make test-latest` does in its
# own environment. A platform without the tested releases (e.g. Python 3.10) needs it.
CONSTRAINTS ?= constraints.txt
PIP_CONSTRAINTS := $(if $(CONSTRAINTS),-c $(CONSTRAINTS))

.PHONY: install test test-latest test-all lint format demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --disable-pip-version-check "$(TORCH_SPEC)" \
	  || $(VPY) -m pip install --quiet --disable-pip-version-check torch
	$(VPY) -m pip install --quiet --disable-pip-version-check $(PIP_CONSTRAINTS) -e ".[$(EXTRAS)]"
	touch $(STAMP)

lint: $(STAMP)
	$(VPY) -m ruff check .
	$(VPY) -m ruff format --check .

format: $(STAMP)
	$(VPY) -m ruff check --fix .
	$(VPY) -m ruff format .

test: lint
	$(VPY) -m pytest -m "not slow" -q

# A fresh environment each time (newest as of today); torch stays TORCH_SPEC unless
# given, e.g. `make test-latest TORCH_SPEC=torch`.
test-latest:
	rm -rf .venv-latest
	$(MAKE) test VENV=.venv-latest CONSTRAINTS=

test-all: lint
	$(VPY) -m pytest -q

# The main job on the embedded default corpus (chitchat, offline): prepare it,
# train a small NDM model and a CVAE baseline (GRU, 5.5 minutes each on 2 CPU
# cores), evaluate both on 300 held-out conversations, print the table and three
# test contexts with each model's responses. Each run measures its step rate first
# and fits max_steps and its warm-ups to the 5.5 minutes (budget.json in its run
# folder; ndm_seq/training/budget.py). The 15-minute total on 2 cores: 2 x 5.5 min
# of training (the fit keeps 10% free; the budget stops training at the latest)
# + about 2.5 min for installation (torch wheel cached), data preparation, the
# tokenizers and the two evaluations.
DEMO_SET := 'output_dir=runs/demo/{name}' training.max_minutes=5.5 evaluation.max_contexts=300

demo: $(STAMP)
	$(VPY) -m ndm_seq.cli compare recipes/chitchat/ndm_gru.yaml recipes/chitchat/cvae_gru.yaml \
	  --output runs/demo $(DEMO_SET)

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(VPY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .venv-latest .pytest_cache .ruff_cache build *.egg-info
