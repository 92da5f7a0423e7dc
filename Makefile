# IMS upload portal. `make run` starts the whole portal on this machine, `make test` runs the tests.
# Both first bring the virtualenv, the npm packages and the collected static files up to date
# (`make setup`), which takes a second when nothing changed.

SHELL := /bin/bash
.DEFAULT_GOAL := help
MAKEFLAGS += --no-print-directory

VENV := .venv
PY := $(VENV)/bin/python
# The test command; the README names the same one. Extra arguments: make test ARGS="-m 'not slow'"
PYTEST := $(PY) -m pytest
ARGS ?=
# The Redis the tests use (tests/conftest.py reads TEST_REDIS_URL); `make test` starts one if needed.
TEST_REDIS_URL ?= redis://127.0.0.1:6379/15
export TEST_REDIS_URL

# Stamps record what is installed: pip's is named after the requirements' content, so editing
# either file (or checking out another version of it) installs again.
REQUIREMENTS_HASH := $(shell cat requirements.txt requirements-dev.txt | sha256sum | cut -c1-16)
PIP_STAMP := $(VENV)/.installed-$(REQUIREMENTS_HASH)
NPM_STAMP := node_modules/.installed
STATIC_STAMP := staticfiles/.collected
STATIC_SOURCES := $(shell find static -type f 2>/dev/null)

.PHONY: help setup run run-prod test screenshots migrate lint messages clean distclean

help:
	@echo "make run        start the portal with Redis, the IMS simulator, worker and beat (Ctrl-C stops all)"
	@echo "make run-prod   the same in the production layout: nginx (https://127.0.0.1:8443), web and ingest pools"
	@echo "make test       run the tests ($(PYTEST); extra options in ARGS=...)"
	@echo "make setup      create $(VENV), install Python and npm packages, collect static files"
	@echo "make screenshots  refresh docs/screenshots/ from a real browser run"
	@echo "make migrate    apply database migrations"
	@echo "make lint       Django's system checks and a check for missing migrations"
	@echo "make messages   bring locale/*/LC_MESSAGES up to date with the code and compile them (then translate)"
	@echo "make clean      delete local state: SQLite database, var/, collected static files"
	@echo "make distclean  clean, and delete $(VENV) and node_modules too"

setup: $(PIP_STAMP) $(STATIC_STAMP)

$(PY):
	@tools/make_venv.sh $(VENV)

$(PIP_STAMP): $(PY)
	@echo "setup: installing Python packages (requirements-dev.txt)"
	@$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	@rm -f $(VENV)/.installed-* && touch $@

# npm ci installs exactly the lock file; without one, npm install (which writes none here).
$(NPM_STAMP): package.json $(wildcard package-lock.json)
	@tools/apt_ensure.sh nodejs:node npm:npm
	@echo "setup: installing npm packages (package.json)"
	@if [ -f package-lock.json ]; then npm ci --no-audit --no-fund --loglevel=error; \
	 else npm install --no-audit --no-fund --no-package-lock --loglevel=error; fi
	@touch $@

$(STATIC_STAMP): $(PIP_STAMP) $(NPM_STAMP) $(STATIC_SOURCES)
	@echo "setup: collecting static files"
	@$(PY) manage.py collectstatic --noinput --clear -v 0
	@touch $@

run: setup
	@$(PY) tools/devserver.py

# The production layout on this machine (docker-compose.yml's, without Docker): Debian's nginx
# in front with deploy/nginx/'s config and a self-signed certificate, /tus/ to an ingest
# gunicorn, the rest to a web gunicorn. nginx is installed with apt-get when missing and root.
run-prod: setup
	@tools/apt_ensure.sh nginx:nginx
	@$(PY) tools/prodserver.py

# Chromium (browser tests), qemu-img (image inspection) and nginx (tests/test_nginx.py) come
# from Debian; installed when missing and root, otherwise a warning (and those tests skip).
# Redis: tools/ensure_redis.py starts one for the run if none answers at TEST_REDIS_URL.
# Without DATABASE_URL the tests use SQLite (.ci/run sets PostgreSQL).
test: setup
	@tools/apt_ensure.sh --optional chromium:chromium qemu-utils:qemu-img nginx:nginx gettext:xgettext
	@$(PY) tools/ensure_redis.py --url "$(TEST_REDIS_URL)" -- $(PYTEST) $(ARGS)

# Refresh the README's screenshots from a real browser run: tests/test_browser_pages.py walks every
# page with realistic uploads (tests/scene.py); the pages it names a picture for land in docs/screenshots/.
screenshots: setup
	@$(PY) tools/ensure_redis.py --url "$(TEST_REDIS_URL)" -- env UPDATE_SCREENSHOTS=1 $(PYTEST) tests/test_browser_pages.py tests/test_browser_review_admin.py tests/test_i18n_browser.py $(ARGS)

migrate: setup
	@$(PY) manage.py migrate

# The translation catalogues (README, "Languages"): collect every wrapped string into each
# locale/<language>/LC_MESSAGES/*.po, then compile the .mo files, which are committed so that a
# fresh clone needs no gettext. tests/test_i18n.py fails while a string has no translation.
messages: setup
	@tools/apt_ensure.sh gettext:xgettext
	@for language in $$(ls locale); do \
	  $(PY) manage.py makemessages --locale $$language -v 0 && \
	  $(PY) manage.py makemessages --locale $$language --domain djangojs -v 0; done
	@$(PY) manage.py compilemessages -v 0

lint: setup
	@$(PY) manage.py check --fail-level WARNING
	@$(PY) manage.py makemigrations --check --dry-run

clean:
	rm -rf var staticfiles db.sqlite3 .pytest_cache test-results
	find . -name __pycache__ -type d -not -path "./$(VENV)/*" -not -path "./node_modules/*" -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) node_modules
