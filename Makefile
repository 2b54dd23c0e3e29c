# hpcrl: `make run` trains the default job, `make test` runs the whole suite.
# Both create ./.venv and install what they need on first use.

PYTHON ?= python3
VENV   ?= .venv
# The pinned torch is the CPU build; an unpinned torch pulls GBs of CUDA packages.
# Override for a GPU node, e.g. `make venv TORCH='torch==2.13.0 --index-url ...'`.
TORCH  ?= torch==2.13.0
NP     ?= 4
PY     := $(VENV)/bin/python
MPIRUN := $(VENV)/bin/mpiexec
STAMP  := $(VENV)/.installed
# Per stage; the e2e stage took ~33 min before Ape-X on a slow 2-core VM, ~40+ with it.
TEST_TIMEOUT ?= 3600

.PHONY: venv run test test-unit test-mpi test-e2e test-slurm lint format bench clean

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[mpich,dev,analysis,video]'
	touch $(STAMP)

## The default job: IMPALA on CartPole-v1, rank 0 learner and ranks 1-3 actors.
run: venv
	$(MPIRUN) -n $(NP) $(PY) -m hpcrl

## Unit tests (no launcher), MPI tests under mpiexec -n 4, end-to-end tests of the real CLI,
## then the job scripts against a local single-node SLURM (skipped, with the reason, where
## the machine cannot run one: not root, or no apt).
test: venv test-unit test-mpi test-e2e test-slurm

# Unit tests need no launcher: one worker per core (pytest-xdist), at most 4.
test-unit: venv
	timeout -k 10 $(TEST_TIMEOUT) $(PY) -m pytest -q -m "not mpi and not e2e and not slurm" --timeout=300 \
		--durations=15 -n auto --maxprocesses=4

test-mpi: venv
	timeout -k 10 $(TEST_TIMEOUT) $(MPIRUN) -n 4 $(PY) -m pytest -q --with-mpi -m mpi \
		--timeout=240 --timeout-method=thread

test-e2e: venv
	timeout -k 10 $(TEST_TIMEOUT) $(PY) -m pytest -q -m "e2e and not slurm" --timeout=300 \
		--durations=30

test-slurm: venv
	timeout -k 10 $(TEST_TIMEOUT) $(PY) -m pytest -q -rs -m slurm --timeout=900

lint: venv
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

format: venv
	$(VENV)/bin/ruff format src tests benchmarks
	$(VENV)/bin/ruff check --fix src tests benchmarks

bench: venv
	$(PY) benchmarks/throughput.py

clean:
	rm -rf $(VENV) build src/*.egg-info
