# tailforge: self-installing targets. `make run` = the main job, `make test` = the test suite.
PY ?= python3
PIP ?= $(PY) -m pip
FASHION := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install datasets run test test-all bench readme-numbers clean

install: datasets
	$(PIP) install -q -e '.[dev,track,pretrained]'

# Debian ships real Fashion-MNIST (IDX files): the offline test dataset.
datasets:
	@[ -f $(FASHION) ] || $(SUDO) apt-get install -y -q dataset-fashion-mnist \
	  || ($(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q dataset-fashion-mnist)

# Main job: the whole pipeline on the embedded default dataset (scikit-learn digits, offline).
run: install
	tailforge run

# The default suite (CI). Slow tests: `make test-all`.
test: install
	$(PY) -m pytest -q -m "not slow" --timeout 600

test-all: install
	$(PY) -m pytest -q --timeout 1800

# README's default-run block (between its readme-numbers markers) from a fresh, timed `tailforge run`.
readme-numbers: install
	$(PY) bench/readme_numbers.py

clean:
	rm -rf runs .pytest_cache
