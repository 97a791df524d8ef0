# The README's two commands: `make serve` and `make test`. Every install step lives here.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed
TORCH   = torch==2.14.1 torchvision==0.29.1

.PHONY: install serve demo test test-slow bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# A random-weight checkpoint in the real single-file layout (it draws noise; it exists
# so the whole path runs with no download). Skipped when already there.
demo: install
	$(PY) -m pipelines.tiny --models ./models --name demo-sd15-tiny --family sd1

serve: demo
	MODEL_STORE=$${MODEL_STORE:-./models} OUTPUT=$${OUTPUT:-./outputs} $(VENV)/bin/serve

test: install
	$(PY) -m pytest -q

# real-size model shapes (minutes; used by the benchmarks)
test-slow: install
	$(PY) -m pytest -q -m slow

bench: install
	$(PY) -m bench.serving_overhead
	$(PY) -m bench.startup
	$(PY) -m bench.jobs_list
	$(PY) -m bench.lora_switch

clean:
	rm -rf $(VENV) .cache outputs
