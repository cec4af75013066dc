# The two commands a new user needs (see README):
#   make run    — install, build the default model if there is none, show translations
#   make test   — install, then lint, type-check and run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RUN ?= runs/default
BUNDLE ?= models/default

.PHONY: install tools run model marian-demo test lint test-slow bench bench-service bench-engines bench-marian bench-fairness bench-slow-readers fuzz-long soak container-check cuda-image-check compose-check clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[export,import,service,cuda,dev,plot,loadtest,bench]'
	touch $@

install: $(VENV)/.installed

# Train (≤ 10 min on 2 cores), export and verify the default model, unless it is there already.
$(BUNDLE)/manifest.json: | $(VENV)/.installed
	@if [ ! -f $(RUN)/checkpoint_best.pt ]; then \
		$(PY) -m export train --run $(RUN) --force; \
	else echo "using the trained run in $(RUN)"; fi
	$(PY) -m export export --run $(RUN) --out $(BUNDLE) --int8 --force

model: $(BUNDLE)/manifest.json

# Serve the bundle and show translations made through gRPC; Ctrl-C drains and stops.
# DEMO_ARGS=--once stops right after the translations.
run: model
	$(PY) -m service demo --bundle $(BUNDLE) $(DEMO_ARGS)

# An OPUS-MT-shaped Marian directory (transformer-base size, RANDOM weights: not a translator),
# imported with verification against transformers, then served with translations shown.
MARIAN_DIR ?= runs/marian-demo-dir
MARIAN_BUNDLE ?= models/marian-demo
marian-demo: install
	$(PY) benchmarks/marian_dirs.py --out $(MARIAN_DIR) --d-model 512 --layers 6 --heads 8 \
		--ffn 2048 --vocab 32000
	$(PY) -m export import-marian $(MARIAN_DIR) --out $(MARIAN_BUNDLE) --force
	$(PY) -m service demo --bundle $(MARIAN_BUNDLE) --once \
		--sentence "the small house by the river" --sentence "a red boat"

# promtool (Debian's prometheus package), unpacked into .tools/ without installing the service.
TOOLS := .tools
$(TOOLS)/root/usr/bin/promtool:
	mkdir -p $(TOOLS)
	cd $(TOOLS) && (apt-get download prometheus 2>/dev/null || \
		(apt-get update -qq && apt-get download prometheus)) && dpkg -x prometheus_*.deb root

tools: $(TOOLS)/root/usr/bin/promtool

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy export service tests benchmarks

test: lint tools
	$(PY) -m pytest -q

# Long checks, opt-in: the full default training run and its acceptance figures.
test-slow: install
	$(PY) -m pytest -q -m slow --run-slow -s

# Service throughput against offline decoding of the same sentences (prints a table).
bench-service: model
	$(PY) benchmarks/service_throughput.py --bundle $(BUNDLE) --models default,small,base

# A single-sentence call's latency beside a 256-sentence call (docs/RELIABILITY.md, fairness).
bench-fairness: model
	$(PY) benchmarks/fairness.py --bundle $(BUNDLE) --rounds 5 --probes 1000

# Server memory under 100 TranslateStream clients that never read (docs/RELIABILITY.md).
bench-slow-readers: model
	$(PY) benchmarks/slow_readers.py --bundle $(BUNDLE) --streams 100

bench: bench-engines bench-service

# Our import of Marian models against CTranslate2's converter, three interleaved rounds (~15 min).
bench-marian: install
	$(PY) benchmarks/engines.py --model marian-small --batches 1,8,32 --rounds 3
	$(PY) benchmarks/engines.py --model marian-base --batches 1,8,32 --rounds 3

# Engine benchmark: PyTorch, our onnxruntime decoding and CTranslate2 on the same weights
# (the default model and a Transformer-base configuration); tables in benchmarks/RESULTS.md.
bench-engines: model
	$(PY) benchmarks/engines.py --model default --run $(RUN)
	$(PY) benchmarks/engines.py --model base

# Opt-in reliability runs (docs/RELIABILITY.md): about 10,000 fuzzed requests; 10 minutes at 70% load.
fuzz-long: install
	FUZZ_REQUESTS=10000 $(PY) -m pytest -q tests/test_fuzz.py

soak: model
	$(PY) benchmarks/soak.py --bundle $(BUNDLE) --minutes 10

# Opt-in: build the Dockerfile on a debootstrapped Debian base, run, check, drain (needs root).
container-check: model
	PY=$(PY) BUNDLE=$(BUNDLE) deploy/container-check.sh

# Opt-in: build (not run) the Dockerfile's cuda target on a Python-less Debian stand-in for the
# CUDA base image (needs root, as container-check).
cuda-image-check: model
	PY=$(PY) BUNDLE=$(BUNDLE) deploy/cuda-image-check.sh

# Opt-in, after container-check: three replicas + Prometheus + the load-test job, via compose.
compose-check: tools
	deploy/compose-check.sh

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
