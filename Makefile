# Run `make help` for the list of targets.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
NOTEBOOKS := 01_explore 02_train 03_evaluate 04_infer 05_audit
DATA ?= data/sample
PAPERMILL_ARGS ?=
TEST_WORKERS ?= 2

.DEFAULT_GOAL := help
.PHONY: help setup reports notebooks train test test-fast lab sample clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[all]'
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

setup: $(STAMP) ## create .venv and install the project with all extras (idempotent)

reports: $(STAMP) ## THE MAIN JOB: run notebooks 01-05 into reports/ (DATA=dir, PAPERMILL_ARGS="-p epochs 5")
	$(PY) -m aimonk.run_notebooks --data $(DATA) --output-dir reports $(PAPERMILL_ARGS) $(NOTEBOOKS)
	@echo "Done: reports/*.ipynb, reports/figures/, models/model.pth"

notebooks: $(STAMP) ## after editing a notebook or its .py: sync the pair (the newer wins), strip outputs
	$(VENV)/bin/jupytext --sync notebooks/*.ipynb
	$(VENV)/bin/jupyter nbconvert --clear-output --inplace --log-level WARN notebooks/*.ipynb
	$(VENV)/bin/jupytext --sync --quiet notebooks/*.ipynb  # the .py newer again, as JupyterLab expects

train: $(STAMP) ## train with the CLI only (no notebooks): python -m aimonk train --data $(DATA)
	$(PY) -m aimonk train --data $(DATA)

test: $(STAMP) ## run every test, the notebooks included (what CI runs): TEST_WORKERS pytest-xdist workers (0: none), then the runtime tests
	$(PY) -m pytest -n $(TEST_WORKERS) -m "not deploy"
	$(PY) -m pytest -m deploy tests

test-fast: $(STAMP) ## unit tests only, skipping slow ones and the notebooks
	$(PY) -m pytest tests -m "not slow"

lab: $(STAMP) ## open JupyterLab on the notebooks
	$(VENV)/bin/jupyter lab notebooks

.PHONY: app voila
app: $(STAMP) ## serve the Streamlit app (MODEL=path, default models/model.pth; RUNTIME=torch|onnxruntime|openvino|auto)
	$(VENV)/bin/streamlit run aimonk/app.py --browser.gatherUsageStats=false --client.toolbarMode=minimal \
	  -- --model $(or $(MODEL),models/model.pth) $(if $(RUNTIME),--runtime $(RUNTIME))

voila: $(STAMP) ## serve notebook 04's upload panel as a page with Voila (upload limits in voila.json)
	$(VENV)/bin/voila notebooks/04_infer.ipynb

sample: $(STAMP) ## regenerate the embedded sample dataset in data/sample
	$(PY) -m aimonk.sample

clean: ## remove generated models, reports and the decoded-image cache
	rm -rf models reports/*.ipynb reports/figures ~/.cache/aimonk
