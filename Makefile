# minillm: `make lab` to learn, `make test` to check everything. Both set up .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
NBVAL  := --nbval --nbval-current-env --nbval-sanitize-with nbval_sanitize.cfg

.PHONY: setup lab test test-unit test-notebooks test-portable test-no-vector test-browser notebooks bench doctor clean

setup: $(STAMP)

# Re-run the install whenever the pins or the package metadata change.
$(STAMP): requirements.txt pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit("minillm needs Python >= 3.11, found " + sys.version.split()[0]) if sys.version_info < (3, 11) else None'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --progress-bar off -r requirements.txt
	$(PY) -m pip install --quiet --progress-bar off --no-deps -e .
	touch $(STAMP)

# Root (e.g. in a container) needs --allow-root; everyone else does not.
lab: setup
	$(VENV)/bin/jupyter lab --ServerApp.root_dir=$(CURDIR) --LabApp.default_url=/lab/tree/chapters \
		$(if $(filter 0,$(shell id -u)),--allow-root)

UNIT_TESTS     := $(PY) -m pytest tests -n 2 --ignore=tests/e2e
NOTEBOOK_TESTS := $(PY) -m pytest $(NBVAL) -n 2 --dist loadfile chapters solutions

# Another x86-64 CPU, emulated on this one by capping the vector instructions torch's own kernels (ATen),
# oneDNN, MKL, OpenBLAS and numpy's dispatch may use (caps only go down). README: "Portability".
AVX2_CAPS      := ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
	OPENBLAS_CORETYPE=Haswell NPY_DISABLE_CPU_FEATURES="X86_V4 AVX512_ICL AVX512_SPR"
NO_VECTOR_CAPS := ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 MKL_ENABLE_INSTRUCTIONS=SSE4_2 \
	OPENBLAS_CORETYPE=Prescott NPY_DISABLE_CPU_FEATURES="X86_V3 X86_V4 AVX512_ICL AVX512_SPR"

# Unit tests and every notebook under nbval; both run even if the first fails, and either failing fails make.
test: setup
	@status=0; \
	$(UNIT_TESTS) || status=1; \
	$(NOTEBOOK_TESTS) || status=1; \
	exit $$status

test-unit: setup
	$(UNIT_TESTS)

test-notebooks: setup
	$(NOTEBOOK_TESTS)

# The same two halves on an emulated AVX2 CPU: the stored outputs must pass there too.
test-portable: setup
	@status=0; \
	env $(AVX2_CAPS) $(UNIT_TESTS) || status=1; \
	env $(AVX2_CAPS) $(NOTEBOOK_TESTS) || status=1; \
	exit $$status

# The unit tests with no vector extensions beyond x86-64's SSE baseline (torch's scalar kernels).
test-no-vector: setup
	env $(NO_VECTOR_CAPS) $(UNIT_TESTS)

# The course the way a learner meets it: JupyterLab in headless Chromium, Run All Cells on chapters 00 and 03
# (tests/e2e). Separate from `make test`: it needs a system browser, installed with apt-get (root or sudo).
test-browser: setup
	bash scripts/install_browser.sh
	$(PY) -m pytest tests/e2e -v

# Re-execute every notebook in place and normalise it; run twice, `git status` stays clean.
notebooks: setup
	$(PY) scripts/run_notebooks.py

bench: setup
	@for script in benchmarks/*.py; do echo "== $$script"; $(PY) $$script --write || exit 1; done

doctor: setup
	$(PY) -m minillm doctor

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
