# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
CTLAB := $(VENV)/bin/ctlab
PYTEST_ARGS ?=
export HF_HUB_OFFLINE ?= 1

.PHONY: install demo zeroshot test test-fast lint mutate clean clean-runs

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

# The main job on the embedded default: synthetic CT-RATE -> smoke matrix -> MLflow -> reports/smoke/.
# Rerunning it trains nothing that already finished; `make clean-runs` starts over. Two one-thread workers
# share the 2 cores it is sized for (DEMO_WORKERS=N OMP_NUM_THREADS=M for a bigger machine).
DATA ?= data/synthetic
DEMO_WORKERS ?= 2
demo: install
	test -f $(DATA)/radiology_text_reports/train_reports.csv || $(CTLAB) data synth --out $(DATA) --train 600 --valid 100
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(CTLAB) matrix run experiments/smoke.yaml --workers $(DEMO_WORKERS)
	$(CTLAB) bench model --matrix experiments/smoke.yaml --track --repeats 3 --out reports/smoke/bench --no-progress
	$(CTLAB) report --matrix smoke --out reports/smoke
	$(CTLAB) ui --screenshot reports/smoke/figures/mlflow-ui.png --parent-screenshot reports/smoke/figures/mlflow-ui-parent.png --experiment smoke --if-chromium
	@echo "Report: reports/smoke/report.md   Browse every run: $(CTLAB) ui  (http://127.0.0.1:5000)"

# Zero-shot on synthetic CT-RATE at its best setting: 2000 training volumes, the fine-tuned MiniLM text tower.
zeroshot: install
	test -f data/synthetic-2000/radiology_text_reports/train_reports.csv || $(CTLAB) data synth --out data/synthetic-2000 --train 2000 --valid 200
	$(CTLAB) train experiments/configs/synthetic-minilm.yaml

clean-runs:
	rm -rf mlflow.db mlartifacts optuna.db runs

# pytest exits 5 when nothing is collected; that is not a failure of the suite.
test: install
	$(PY) -m pytest $(PYTEST_ARGS) || [ $$? -eq 5 ]

test-fast: install
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS) || [ $$? -eq 5 ]

lint: install
	$(VENV)/bin/ruff check .

# Mutation testing (mutmut) of the modules whose silent failure would corrupt results, against their fast
# tests; writes reports/mutation.md. Not part of `make test`. MODULES=core/metrics.py limits it to some;
# MUTATE_ARGS="--minutes 20 --max-children 8" bounds the time per module.
MODULES ?=
MUTATE_ARGS ?=
mutate: install
	$(PY) .ci/mutate.py $(MODULES) $(MUTATE_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
