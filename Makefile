# Two commands matter: `make run` and `make test`. Both create .venv and install requirements first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install nginx run redis test test-fast lint settings-doc bench soak deliverables report container-smoke clean

$(STAMP): requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	touch $(STAMP)

install: $(STAMP) nginx

# nginx, which `make run` puts in front of gunicorn (PROXY, proxy.py): installed with apt-get when missing, where
# this runs as root; elsewhere a message, and `make run` serves with gunicorn alone.
nginx:
	@if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ]; then \
	    if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	        echo "== installing nginx-light with apt-get"; \
	        DEBIAN_FRONTEND=noninteractive apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light; \
	    else \
	        echo "nginx is not installed: make run will serve with gunicorn alone, which slow clients can starve."; \
	        echo "Install it (sudo apt-get install nginx-light, or your system's nginx package) to put it in front."; \
	    fi; \
	fi

run: $(STAMP) nginx
	$(BIN)/python -m imgserve.launch.serve

# A Redis alone, in the foreground (the bundled redis-server, no persistence): make redis [PORT=6380]; Ctrl-C stops it.
redis: $(STAMP)
	$(BIN)/python -m imgserve.launch.local_redis $(PORT)

test: $(STAMP)
	$(BIN)/python -m pytest

# The unit tests alone (in-process, real Redis, no worker or web processes): under a minute.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m unit

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The README's settings table and .env.example, rewritten from the declarations in imgserve/settings.py
# (`python -m tools.settings_doc --check` only compares; tests/test_settings.py fails while either is stale).
settings-doc: $(STAMP)
	$(BIN)/python -m tools.settings_doc

# The model alone vs the whole serving path, in one run (~15 min here; `python -m tools.bench --quick` ~4 min;
# --help for flags). The tools (benchmark, deliverables, report, process harness) live in tools/.
bench: $(STAMP)
	$(BIN)/python -m tools.bench

# 20,000 requests through make run's stack, watching memory and Redis's keys (~15 min here; tools/soak.py --help).
soak: $(STAMP) nginx
	$(BIN)/python -m tools.soak

deliverables: $(STAMP)
	$(BIN)/python -m tools.deliverables

# The mermaid npm package (tools/report.py draws the diagrams with it in Chromium), as tools/package-lock.json pins it.
tools/node_modules/.package-lock.json: tools/package-lock.json
	cd tools && npm ci --no-audit --no-fund
	touch $@

# deliverables/report.pdf from the eight Markdown documents in deliverables/.
report: $(STAMP) tools/node_modules/.package-lock.json
	$(BIN)/python -m tools.report

# The image built FROM a debootstrap base, compose.yaml under podman-compose, castle predictions through nginx
# (deploy/smoke.sh: installs podman & co. with apt-get when missing; ~10 min the first time, ~2 min after).
container-smoke:
	bash deploy/smoke.sh

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
