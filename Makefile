# make run: the full default pipeline; make test: the test suite. Both build .venv when it is missing.
PY := .venv/bin/python
MODEL ?= mobilenet_v2
# Use the local CIFAR-10 copy when one sits beside the repo and CIFAR10_DIR is not set.
ifeq ($(CIFAR10_DIR),)
ifneq ($(wildcard ../shared/data/cifar10),)
export CIFAR10_DIR := ../shared/data/cifar10
endif
endif

.PHONY: setup run test
setup: .venv/.complete

.venv/.complete: requirements.txt
	python3 -m venv .venv
	.venv/bin/pip install --upgrade pip
	.venv/bin/pip install -r requirements.txt
	touch $@

run: setup
	$(PY) cifar.py --model $(MODEL) $(ARGS)

test: setup
	$(PY) -m pytest -v --durations=10 tests
