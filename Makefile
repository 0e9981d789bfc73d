# interbrain: the two commands of the README are `make run` and `make test`.
# Both create the virtual environment (.venv) when it is missing; every dependency is pinned in pyproject.toml.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CORES  ?= all
SNAKEMAKE_ARGS ?=

.PHONY: setup run test test-fast bench dag clean-results

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip==23.2.1
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[workflow,test]'
	touch $(STAMP)

setup: $(STAMP)

## The main job: the default study of config.yaml, end to end, then the cross-architecture report.
run: $(STAMP)
	$(BIN)/snakemake --cores $(CORES) $(SNAKEMAKE_ARGS)

## The whole test suite (the SLURM tests run when a cluster is up: see .ci/slurm-up).
test: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q

test-fast: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q -m "not slow and not slurm"

bench: $(STAMP)
	mkdir -p benchmarks/out
	$(BIN)/python benchmarks/train_throughput.py --interleave 10 | tee benchmarks/out/train_throughput.json
	$(BIN)/python benchmarks/analysis_speed.py | tee benchmarks/out/analysis_speed.json

dag: $(STAMP)
	$(BIN)/snakemake --rulegraph | dot -Tsvg > docs/rulegraph.svg
