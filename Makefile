# Two commands a new user needs: `make demo` and `make test`. Both create or reuse .venv.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.transmem-installed
OUT    ?= runs/demo-$(shell date +%Y%m%d-%H%M%S)

.PHONY: demo test install clean-venv

install: $(STAMP)

# torch is installed first and alone, pinned, so that no other package can pull a CUDA build.
# nowcast (pysteps, built from its sdist in about a minute) gives the extrapolation baseline;
# io, grib, zarr: the xarray reader (netCDF, GRIB, zarr) and TIFF stacks, which the tests read.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,nowcast,io,grib,zarr]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/transmem demo --out $(OUT)

test: $(STAMP)
	$(PY) -m pytest

clean-venv:
	rm -rf $(VENV)
