# The two quick-start commands: `make demo` and `make test`. Each creates .venv and installs what it needs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
SHAPES := data/shapes
RUN    := runs/shapes

.PHONY: demo test test-fast install clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements.txt pytest
	touch $@

# Build Shapes, train on it from scratch on the CPU, caption held-out images, score the test split.
demo: install
	test -f $(SHAPES)/results.csv || $(PY) -m captioning shapes $(SHAPES) --images 3000
	rm -rf $(RUN)
	$(PY) -m captioning train --config configs/shapes.yaml
	$(PY) -m captioning caption --checkpoint $(RUN)/best.pt \
	    $$($(PY) -c "import json; print(*('$(SHAPES)/flickr30k_images/' + n for n in json.load(open('$(RUN)/splits.json'))['test'][:4]))")
	$(PY) -m captioning evaluate --checkpoint $(RUN)/best.pt --split test --out $(RUN)/test_predictions.json

# The whole suite, slow end-to-end tests included (what CI runs).
test: install
	$(PY) -m pytest

# Everything but the slow end-to-end tests.
test-fast: install
	$(PY) -m pytest -m "not slow"

clean:
	rm -rf $(VENV) runs data
