# The README names two targets: `make demo` (the main job) and `make test` (everything CI runs).
# The venv's interpreter: Debian's python3.11 where it can make venvs (built with profile-guided
# and link-time optimisation and libpython linked in, as the Dockerfile's python:3.11-slim is),
# else python3 on PATH. pyenv's default build is neither: on it the worker's own work takes
# about a fifth more CPU (docs/benchmark.md). `make PYTHON=...` chooses another; `make clean`
# first, as an existing .venv is kept.
PYTHON ?= $(or $(shell for p in /usr/bin/python3.11 python3; do \
	$$p -c 'import ensurepip, venv' 2>/dev/null && { echo $$p; break; }; done),python3)
VENV ?= .venv
BIN := $(VENV)/bin
PACKAGES := pipeline agents sinks schemas
TEST_KAFKA_PORT ?= 39092

.PHONY: install tools demo test lint typecheck pytest kafka-up kafka-down clean

$(BIN)/loopline: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

install: $(BIN)/loopline

# Debian's chromium (the tests open the report and the review page in it through Playwright),
# Debian's prometheus (promtool tests the alert rules; a test runs a live Prometheus) and
# Debian's docker-compose (`docker-compose config` checks docker-compose.yml, no engine needed);
# installed with apt-get when missing (CI runs as root).
tools:
	@command -v chromium >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 \
		&& command -v docker-compose >/dev/null 2>&1 || { \
		echo "installing Debian's chromium, prometheus and docker-compose (apt-get) for the tests"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			chromium prometheus docker-compose >/dev/null; }

demo: install
	$(BIN)/loopline demo

lint: install
	$(BIN)/ruff check $(PACKAGES) tests bench
	$(BIN)/ruff format --check $(PACKAGES) tests bench

typecheck: install
	$(BIN)/mypy

# The tests start the real broker themselves (port $(TEST_KAFKA_PORT)); it is stopped
# afterwards whether the tests pass or fail.
pytest: install tools
	TEST_KAFKA_PORT=$(TEST_KAFKA_PORT) $(BIN)/pytest; status=$$?; \
	$(BIN)/loopline kafka down --port $(TEST_KAFKA_PORT); exit $$status

test: lint typecheck pytest

kafka-up: install
	$(BIN)/loopline kafka up

kafka-down: install
	$(BIN)/loopline kafka down

clean:
	rm -rf $(VENV) .loopline .pytest_cache .mypy_cache .ruff_cache *.egg-info
