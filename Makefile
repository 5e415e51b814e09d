# Two commands matter: `make run` and `make test`. Both create .venv and install requirements first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install run test lint bench deliverables report clean

$(STAMP): requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/python serve.py

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The model alone vs the whole serving path, in one run (~9 min here; `bench.py --quick` ~3 min; --help for flags).
bench: $(STAMP)
	$(BIN)/python bench.py

deliverables: $(STAMP)
	$(BIN)/python deliverables.py

# The mermaid npm package (report.py draws the diagrams with it in Chromium), as package-lock.json pins it.
node_modules/.package-lock.json: package-lock.json
	npm ci --no-audit --no-fund
	touch $@

# deliverables/report.pdf from the eight Markdown documents in deliverables/.
report: $(STAMP) node_modules/.package-lock.json
	$(BIN)/python report.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
