# The two quick-start commands: `make demo` and `make test`. Each creates .venv and installs what it needs.
PYTHON ?= python3
PORT   ?= 8765
VENV   := .venv
PY     := $(VENV)/bin/python
SHAPES := data/shapes
RUN    := runs/shapes
SCST   := runs/shapes_scst

.PHONY: demo figures test test-fast lint install clean

install: $(VENV)/.installed

# pyproject.toml lists every dependency: the package's own, the notebooks extra (jupyter, papermill, ipykernel)
# and the dev extra (pytest, ruff). requirements.txt repeats the first two for `pip install -r requirements.txt`.
$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -e ".[notebooks,dev]"
	touch $@

# Build Shapes, then run the two notebooks headless on it: training.ipynb trains from scratch on the
# CPU and scores the test split, then trains configs/shapes_scst.yaml ($(SCST)) from its best.pt and
# scores that; inference.ipynb captions a held-out image from its path and another
# from a URL served on 127.0.0.1. The executed notebooks, checkpoints and figures land in $(RUN); each
# executed notebook loses papermill's injected-parameters cell (scripts/strip_injected.py), so it can be
# copied over the committed one without overriding a Jupyter reader's parameters cell. --log-output shows
# what the cells print as they run (a line per epoch, the test scores); the last lines say where it all is.
NOTEBOOK := $(PY) -m papermill --log-output --no-progress-bar
demo: install
	test -f $(SHAPES)/results.csv || $(PY) -m captioning shapes $(SHAPES) --images 3000
	rm -rf $(RUN) $(SCST) && mkdir -p $(RUN)
	$(NOTEBOOK) training.ipynb $(RUN)/training.ipynb -p config configs/shapes.yaml
	$(PY) scripts/strip_injected.py $(RUN)/training.ipynb
	$(PY) -m http.server $(PORT) --bind 127.0.0.1 --directory $(SHAPES)/flickr30k_images >/dev/null 2>&1 & \
	trap "kill $$!" EXIT; sleep 1; \
	set -- $$($(PY) -c "import json; print(*json.load(open('$(RUN)/splits.json'))['test'][:2])"); \
	$(NOTEBOOK) inference.ipynb $(RUN)/inference.ipynb -p checkpoint $(RUN)/best.pt \
	    -y "images: [$(SHAPES)/flickr30k_images/$$1, 'http://127.0.0.1:$(PORT)/$$2']"
	$(PY) scripts/strip_injected.py $(RUN)/inference.ipynb
	@echo "done: the executed notebooks are $(RUN)/training.ipynb and $(RUN)/inference.ipynb; the model"
	@echo "  $(RUN)/best.pt (scores: $(RUN)/test_predictions.json), after SCST $(SCST)/best.pt; figures in $(RUN)."
	@echo "  Commands use the venv make built: source $(VENV)/bin/activate, then e.g."
	@echo "  python -m captioning caption --checkpoint $(RUN)/best.pt $(SHAPES)/flickr30k_images/000000.png"

# Maintainers, after `make demo`: the executed notebooks and the figures of that run into the repo (the
# committed outputs and the README's figures come from here), and the attention maps of the first test image.
figures:
	cp $(RUN)/training.ipynb training.ipynb
	cp $(RUN)/inference.ipynb inference.ipynb
	cp $(RUN)/loss.png imgs/shapes_loss.png
	cp $(RUN)/lr.png imgs/shapes_lr.png
	cp $(RUN)/data_examples.png imgs/shapes_data_examples.png
	cp $(RUN)/test_predictions.png imgs/shapes_test_predictions.png
	cp $(SCST)/reward.png imgs/shapes_scst_reward.png
	rm -rf imgs/attention
	set -- $$($(PY) -c "import json; print(json.load(open('$(RUN)/splits.json'))['test'][0])"); \
	$(PY) -m captioning caption --checkpoint $(RUN)/best.pt --attention imgs/attention $(SHAPES)/flickr30k_images/$$1

# ruff, configured in pyproject.toml ([tool.ruff]).
lint: install
	$(VENV)/bin/ruff check .

# The linter, then the whole suite, slow end-to-end tests included (what CI runs).
test: lint
	$(PY) -m pytest

# The linter, then everything but the slow end-to-end tests.
test-fast: lint
	$(PY) -m pytest -m "not slow"

clean:
	rm -rf $(VENV) runs data
