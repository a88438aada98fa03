# One entry point. `make demo` and `make test` create the virtualenv themselves.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat requirements.txt requirements-dev.txt | cksum | cut -d' ' -f1)
# Tests always run on PostgreSQL and a Redis database of their own (they flush it). `make test-fast`
# runs on TEST_FAST_WORKERS processes (pytest-xdist), worker N on TEST_REDIS_URL's database + N: with
# the defaults, databases 14 and 15 (Redis has 0-15).
TEST_DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/test
TEST_REDIS_URL ?= redis://127.0.0.1:6379/14
TEST_FAST_WORKERS ?= 2
# `make test-rabbitmq`: the broker-sensitive worker tests again with RabbitMQ as the broker, in a
# vhost of the run's own (created with rabbitmqctl if missing; its queues are emptied per test).
TEST_RABBITMQ_URL ?= amqp://guest:guest@127.0.0.1:5672/pushsvc_test
RABBITMQ_TESTS ?= tests/rabbitmq tests/test_campaign_flow.py tests/test_direct_send.py \
	tests/reliability/test_worker_killed.py
# pushsvc refuses to start with DEBUG off and no SECRET_KEY of its own (pushsvc/settings.py). The
# targets below are for development, tests and the demo: unless SECRET_KEY is set, they use a random
# key made once per checkout (var/dev-secret-key, not in git). Production sets SECRET_KEY itself.
export SECRET_KEY ?= $(shell mkdir -p var && { [ -s var/dev-secret-key ] || $(PYTHON) -c "import secrets; print(secrets.token_urlsafe(64))" > var/dev-secret-key; } && cat var/dev-secret-key)

.PHONY: venv demo test test-fast test-slow test-rabbitmq lint migrate simulator web worker beat flower bench browser-deps

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	rm -f $(VENV)/.installed-*
	touch $@

demo: venv
	$(PY) manage.py demo

test: venv browser-deps
	DATABASE_URL=$(TEST_DATABASE_URL) REDIS_URL=$(TEST_REDIS_URL) $(PY) -m pytest $(PYTEST_ARGS)

# The two lanes of `make test` (tests/conftest.py marks what is slow): in-process tests only, and
# the rest (Celery workers, fault tests, browser, schemathesis, tests that start processes of their
# own). With exactly -m "not slow", the files holding only slow tests are not even imported.
# The fast lane runs on TEST_FAST_WORKERS xdist processes (tests/xdist_workers.py: a Redis database
# and a PostgreSQL test database each); TEST_FAST_WORKERS=0 runs it in one process. `make test` and
# the slow lane stay in one process (their tests start workers and servers of their own).
test-fast: venv
	DATABASE_URL=$(TEST_DATABASE_URL) REDIS_URL=$(TEST_REDIS_URL) $(PY) -m pytest -m "not slow" \
		-p tests.xdist_workers -n $(TEST_FAST_WORKERS) $(PYTEST_ARGS)

test-slow: venv browser-deps
	DATABASE_URL=$(TEST_DATABASE_URL) REDIS_URL=$(TEST_REDIS_URL) $(PY) -m pytest -m slow $(PYTEST_ARGS)

# RabbitMQ as the broker (README "Choosing a broker"): quorum queues, publisher confirms, a campaign
# end to end, the priority lane, a worker killed, connections cut, queues purged, the node restarted.
test-rabbitmq: venv
	DATABASE_URL=$(TEST_DATABASE_URL) REDIS_URL=$(TEST_REDIS_URL) CELERY_BROKER_URL=$(TEST_RABBITMQ_URL) \
		$(PY) -m pytest $(RABBITMQ_TESTS) $(PYTEST_ARGS)

# The browser test (tests/browser/) drives Debian's chromium through chromium-driver; install them
# on a fresh machine (as root, or through sudo) only when they are missing.
browser-deps:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
		echo "Installing chromium and chromium-driver for tests/browser"; \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y chromium chromium-driver; \
	fi

lint: venv
	$(VENV)/bin/ruff check .

migrate: venv
	$(PY) manage.py migrate

simulator: venv
	$(PY) -m simulator

web: venv
	# granian served 1.5x the registrations/s of gunicorn sync workers in bench/register.py
	$(VENV)/bin/granian --interface wsgi pushsvc.wsgi:application --workers 2 --blocking-threads 2 --host 127.0.0.1 --port 8000

worker: venv
	$(VENV)/bin/celery -A pushsvc worker -E -Q default,priority,apns,fcm,hms,webpush,webhooks -O fair

beat: venv
	$(VENV)/bin/celery -A pushsvc beat

flower: venv
	$(VENV)/bin/celery -A pushsvc flower --address=127.0.0.1 --port=5555
