# Two user-facing targets: `make demo` and `make test`. Both work on a fresh machine with only Python 3.10+.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo compare test install install-test lint clean-venv

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, so that no later resolution pulls a CUDA build
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -q -e ".[test,label]"
	# MONAI Label 0.8.5 without its torchvision / sam2 requirements (they need a CUDA torch)
	$(PIP) install -q --no-deps monailabel==0.8.5
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

DEMO_OUT ?= results/demo

# With shipped weights (regnet_zoo/pretrained, or $$REGNET_ZOO_PRETRAINED): every method's weights register the
# real pairs of ../shared/data (read in place; built-in phantom pairs without it), no training step, alone and with
# 20 instance-optimisation steps, beside the affine stage alone and SimpleITK's affine. Without weights: the quick
# trained comparison on built-in phantoms.
demo: $(VENV)/.installed
	@if $(PY) -c "import sys; from regnet_zoo.pretrained import shipped_files; sys.exit(not shipped_files())"; then \
		MPLBACKEND=Agg $(PY) benchmarks/zoo_eval.py --demo --sitk-affine --instance-opt 0 20 --out $(DEMO_OUT)/zoo_demo; \
	else \
		echo "no shipped weights: training and comparing on built-in phantoms"; \
		MPLBACKEND=Agg $(PY) benchmarks/compare.py --dataset builtin --quick --out $(DEMO_OUT); \
	fi

compare: demo

test: $(VENV)/.installed-test
	# pytest exit 5 means "no tests collected": report it instead of failing obscurely
	$(PY) -m pytest -q -ra; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check regnet_zoo tests benchmarks

clean-venv:
	rm -rf $(VENV)
