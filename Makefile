# Keyvault: `make run` serves the console, `make test` runs the whole suite.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat requirements.txt | cksum | cut -d' ' -f1)

.PHONY: run test venv bench loadtest clean

venv: $(STAMP)

$(STAMP): requirements.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	@rm -f $(VENV)/.installed-*
	@touch $@

run: $(STAMP)
	$(BIN)/python manage.py devserver

test: $(STAMP)
	scripts/test.sh

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -r bench/requirements.txt
	$(BIN)/python bench/envelope.py

# 50 console users with 2FA browse for 60 s against gunicorn + PostgreSQL while rotations run.
LOADTEST_DB ?= postgres://postgres@127.0.0.1:5432/kv_loadtest
loadtest: $(STAMP)
	$(BIN)/python bench/loadtest.py --users 50 --duration 60 --database-url $(LOADTEST_DB)

clean:
	rm -rf $(VENV) var artifacts
