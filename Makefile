# make demo   fresh machine: creates .venv, installs, fine-tunes the embedded default on CPU
# make demo-sweep   then: a 3-trial LoRA sweep of the same job (Ray Tune, ASHA, W&B offline, seeded)
# make demo-dpo   preference tuning (DPO) of the same house style from chosen/rejected pairs
# make demo-grpo   GRPO: answers the model samples, rewarded for the same house style
# make demo-distill   distillation: the demo's variant teaches the base model its house style
# make test   installs the same way, runs the whole test suite (CI runs it; about 31-35 min on 2 cores with the install)
# make test-fast   unit tests and the quick integration tests (no `slow` mark), a few minutes
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: install demo demo-sweep demo-dpo demo-grpo demo-distill test test-fast clean

install: $(VENV)/.installed

# torch first (the pinned CPU build on this disk), then deepspeed and everything else without
# build isolation so deepspeed's source build uses that torch instead of downloading another.
# Without a GPU, DeepSpeed's CPU ops (Adam for optimizer offload, the shared-memory collective)
# compile while the rest installs: once per machine (~/.cache/torch_extensions), about 1 min
# that the first DeepSpeed run would otherwise spend in its workers. A failed build is only a
# note: that first run builds them.
DEEPSPEED_PINS = $(shell grep -oE '"(deepspeed|numpy|pydantic)==[^"]+"' pyproject.toml | tr -d '"')
CPU_OPS = from deepspeed.accelerator import get_accelerator as a; 	a()._name != "cpu" or [a().create_op_builder(op).load() for op in ("CPUAdamBuilder", "ShareMemCommBuilder")]

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip "setuptools>=68" wheel
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet --no-build-isolation $(DEEPSPEED_PINS)
	$(BIN)/python -c '$(CPU_OPS)' > $(VENV)/deepspeed-ops.log 2>&1 & ops=$$!; trap 'kill $$ops 2>/dev/null' INT TERM; \
	  $(BIN)/pip install --quiet --no-build-isolation -e ".[dev]" || { kill $$ops; exit 1; }; \
	  wait $$ops || echo "note: DeepSpeed's CPU ops were not built ($(VENV)/deepspeed-ops.log); the first DeepSpeed run builds them"
	touch $@

demo: install
	$(BIN)/ft-ray train configs/tiny-cpu.yaml

demo-sweep: install
	$(BIN)/ft-ray tune configs/sweep-tiny.yaml
	$(BIN)/ft-ray report runs/tiny-sweep

demo-dpo: install
	$(BIN)/ft-ray train configs/tiny-dpo.yaml

demo-grpo: install
	$(BIN)/ft-ray train configs/tiny-grpo.yaml

demo-distill: install
	test -f runs/tiny-cpu/summary.json || $(BIN)/ft-ray train configs/tiny-cpu.yaml
	test -f runs/tiny-cpu-merged/config.json || $(BIN)/ft-ray export runs/tiny-cpu --merge --out runs/tiny-cpu-merged
	$(BIN)/ft-ray train configs/tiny-distill.yaml

test: install
	$(BIN)/python -m pytest

test-fast: install
	$(BIN)/python -m pytest -m "not slow"

clean:
	rm -rf runs .pytest_cache
