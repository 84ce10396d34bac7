# Two commands for a newcomer:  `make demo`  and  `make test`  (see README.md).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch/torchvision are pinned here (not in pyproject's ranges) because these exact
# releases are the ones available offline on the project's machines.
TORCH  := torch==2.14.1 torchvision==0.29.1
# glibc's malloc keeps freed memory for reuse (one heap for all threads, no block mapped on its own,
# trimmed past 512 MiB free) and backs it with transparent huge pages: a study's 100 MB activations
# otherwise cost one page fault per 4 kB, each pass (docs/performance.md). The same string as
# tasks/memory.py's MALLOC_TUNABLES; the command line sets the same at run time.
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1:glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=536870912
# The default editable install (tests/test_install.py also checks a non-editable one).
EDITABLE := -e .

.PHONY: demo test test-fast install install-dev browser clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q $(EDITABLE)
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed
	$(BIN)/pip install -q $(subst .,".[dev]",$(EDITABLE))
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

# Study the built-in dataset with the built-in model and four methods (one contrastive:
# why the prediction, not the runner-up?), score the maps with four metrics (the baseline
# maps beside them), find the strategies of Grad-CAM per class (SpRAy clusters), and write the
# atlas: leaves runs/shapes.zarr, runs/shapes.png, the curves, the score table and the HTML report
# runs/shapes.report/index.html (open it in a browser).
demo: install
	$(BIN)/saliency-atlas study --dataset shapes --model shapes-cnn \
		--methods saliency,gradcam,occlusion,contrastive_gradcam --samples 256 --store runs/shapes.zarr \
		--metrics pointing_game,relevance_mass,deletion,insertion --figure runs/shapes.png
	$(BIN)/saliency-atlas status runs/shapes.zarr
	$(BIN)/saliency-atlas evaluate runs/shapes.zarr --metrics pointing_game,relevance_mass,deletion,insertion
	$(BIN)/saliency-atlas clusters runs/shapes.zarr --method gradcam
	$(BIN)/saliency-atlas report runs/shapes.zarr --out runs/shapes.report

# Debian's chromium and chromium-driver for the browser tests (apt-get, as root, when missing);
# without them those tests fail, saying how to install them.
browser: install-dev
	@$(BIN)/python -c "import sys; sys.path.insert(0, 'tests'); import browser; browser.ensure_chromium()" \
		|| echo "warning: chromium and chromium-driver are missing; the browser tests will fail"

# The whole test suite (what CI runs), in two processes: many tests wait on a subprocess, a Prefect
# server or a browser, so two share CI's two cores well: 15.5 min on a clean clone here, against 31-33 in one.
# pytest's exit code is kept: 5 (no test ran) fails.
TEST_WORKERS ?= 2
test: install-dev browser
	$(BIN)/python -m pytest -n $(TEST_WORKERS)

# Everything but the tests marked slow.
test-fast: install-dev browser
	$(BIN)/python -m pytest -n $(TEST_WORKERS) -m "not slow"

clean:
	rm -rf runs .pytest_cache
