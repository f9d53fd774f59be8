# Two commands for a newcomer: `make demo` (set up, then run the service end to end on embedded
# defaults) and `make test` (set up, then run the whole test suite). Everything else is a helper.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_DIR := .pluristeer

.PHONY: setup browser compose-tool demo eval-demo test lint bench bench-gguf clean

TORCH_VERSION ?= 2.13.0

# torch first, chosen for this machine (scripts/install_torch.sh: the CUDA build on a GPU host, else the
# CPU build from PyTorch's CPU wheel index), so pip never pulls a multi-GB CUDA build onto a CPU host;
# pyproject.toml keeps a range.
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	bash scripts/install_torch.sh $(BIN) $(TORCH_VERSION)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

setup: $(BIN)/.installed
	$(BIN)/pluristeer model fetch

# The offline path: build a DiffMean profile from a bundled sample and compare it with the unsteered model.
eval-demo: setup
	$(BIN)/pluristeer build --method diffmean --data tests/fixtures/opinions_group_rural.jsonl --limit 20 \
		--out $(DEMO_DIR)/rural-diffmean.safetensors
	$(BIN)/pluristeer eval --profile $(DEMO_DIR)/rural-diffmean.safetensors \
		--data tests/fixtures/opinions_group_rural.jsonl --offset 20

# The main path: the service end to end (up, a group, its opinions, a profile build, its metrics, A/B).
demo: setup
	bash scripts/demo.sh

# The console's browser tests drive the system's Chromium through chromedriver: install both when absent
# (root and apt-get: a fresh CI machine), otherwise say what is missing. Without Recommends (upower, udev,
# a notification daemon, printer tools, fonts-liberation: fontconfig brings DejaVu fonts instead).
browser:
	@if ! { command -v chromium || command -v chromium-browser; } >/dev/null || ! command -v chromedriver >/dev/null; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium chromium-driver; \
		else \
			echo "the console's browser tests need Chromium and chromedriver (e.g. apt-get install chromium chromium-driver)"; \
			exit 1; \
		fi; \
	fi

# tests/operations/test_compose.py validates docker-compose.yml with the `docker-compose` tool (Debian's package; no
# Docker daemon needed): install it when absent (root and apt-get), otherwise say what is missing. Without
# Recommends: Debian's docker-compose recommends docker.io (the daemon, containerd, runc, iptables: 286 MB),
# which `docker-compose config` never talks to.
compose-tool:
	@if ! command -v docker-compose >/dev/null; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends docker-compose; \
		else \
			echo "tests/operations/test_compose.py needs the docker-compose tool (e.g. apt-get install docker-compose)"; \
			exit 1; \
		fi; \
	fi

test: setup browser compose-tool
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/pytest -q

# mypy's files and strictness are in pyproject.toml ([tool.mypy]).
lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: setup
	for script in bench/*.py; do $(BIN)/python $$script || exit 1; done

# llama.cpp itself reading the default model's GGUF with an exported control vector, beside pluristeer's own
# reads (bench/bench_gguf.py). Not part of `make test` nor CI: llama-cpp-python (the `gguf-bench` extra) has
# no wheels, so installing it compiles llama.cpp (about 18 min on 2 cores; portable build, as measured in
# docs/results.md). `make bench` runs the script too, and it says it skipped when llama-cpp-python is absent.
GGUF_CMAKE_ARGS ?= -DGGML_NATIVE=OFF
bench-gguf: setup
	CMAKE_ARGS="$(GGUF_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(BIN)/pip install --quiet -e '.[gguf-bench]'
	$(BIN)/python bench/bench_gguf.py

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache .ruff_cache .mypy_cache
