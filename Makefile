# Two commands a new user needs: `make demo` and `make test`. Both create or reuse .venv.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.transmem-installed
OUT    ?= runs/demo-$(shell date +%Y%m%d-%H%M%S)
# The exact versions of the whole environment (see its header). `make install LOCK=` installs
# the newest versions in pyproject.toml's ranges instead.
LOCK   ?= requirements.lock
EXTRAS := test,nowcast,io,grib,zarr
LOCKVENV ?= .venv-lock

.PHONY: demo test test-fast install lock reproduce clean-venv

install: $(STAMP)

# torch is installed first and alone, pinned, so that no other package can pull a CUDA build.
# Then every other package at the lock's exact version, then transmem itself without resolving
# anything. nowcast (pysteps, built from its sdist in about a minute) gives the extrapolation
# baseline; io, grib, zarr: the xarray reader (netCDF, GRIB, zarr) and TIFF stacks, which the
# tests read.
$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
ifneq ($(strip $(LOCK)),)
	$(PY) -m pip install -q -r $(LOCK)
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m pip check
else
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
endif
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/transmem demo --out $(OUT)

test: $(STAMP)
	$(PY) -m pytest

# The fast lane while working: unit tests only -- every test not marked `slow` (training runs,
# the CLI end to end, processes) -- in under a minute on this 2-core machine. One torch thread:
# these tensors are small, and two threads per process oversubscribe a shared 2-core machine
# (measured: 46 s with one thread, 3 min with two, under the same load). `make test` (what CI
# runs) stays the whole suite.
test-fast: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -m "not slow and not cuda" -p no:cacheprovider

# Rerun the demo and compare it with the README's table (benchmarks/results/demo_readme.json)
# within the tolerance measured in benchmarks/results/reproducibility.json; non-zero exit and
# the rows outside when it does not reproduce.
reproduce: $(STAMP)
	$(PY) benchmarks/reproduce.py --out $(OUT)

# Refresh the lock: the newest versions in pyproject.toml's ranges, resolved in a scratch venv
# ($(LOCKVENV), removed after); the lock's header comment is kept.
lock:
	rm -rf $(LOCKVENV)
	python3 -m venv $(LOCKVENV)
	$(LOCKVENV)/bin/python -m pip install -q torch==2.13.0
	$(LOCKVENV)/bin/python -m pip install -q -e '.[$(EXTRAS)]'
	grep '^#' $(LOCK) > $(LOCK).tmp
	$(LOCKVENV)/bin/python -m pip freeze --exclude-editable | sed -E 's/^(torch==[^+]*)\+.*/\1/' >> $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	rm -rf $(LOCKVENV)

clean-venv:
	rm -rf $(VENV)
