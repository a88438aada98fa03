"""pushsvc settings.

Every knob is read here, once, from the environment; nothing else in the code base reads
os.environ. Each variable is documented in the README ("Configuration") with its default.
"""

from __future__ import annotations

import ipaddress
import os
from datetime import timedelta
from pathlib import Path

import dj_database_url
from celery.schedules import crontab
from kombu import Exchange, Queue

from delivery.providers.specs import SPECS as PROVIDER_SPECS
from pushsvc import logging as _logging

BASE_DIR = Path(__file__).resolve().parent.parent


def _env(name: str, default: str = "") -> str:
    return os.environ.get(name, default)


def _env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    return raw.strip().lower() in {"1", "true", "yes", "on"}


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    return int(raw) if raw not in (None, "") else default


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    return float(raw) if raw not in (None, "") else default


def _env_list(name: str, default: str) -> list[str]:
    return [item.strip() for item in _env(name, default).split(",") if item.strip()]


# --- Django core -----------------------------------------------------------------------------
DEBUG = _env_bool("DEBUG", False)
# The public development key is accepted only with DEBUG on. With DEBUG off (production, the
# Makefile's targets, the tests, the demo) SECRET_KEY must be set and at least 50 characters (what
# `check --deploy` wants): anyone who knows the key can forge sessions and signed cookies.
DEVELOPMENT_SECRET_KEY = "pushsvc-insecure-development-key-change-me"
SECRET_KEY_MIN_LENGTH = 50
SECRET_KEY = _env("SECRET_KEY", DEVELOPMENT_SECRET_KEY)
if not DEBUG and (
    SECRET_KEY == DEVELOPMENT_SECRET_KEY
    or len(SECRET_KEY) < SECRET_KEY_MIN_LENGTH
    or len(set(SECRET_KEY)) < 5  # "aaaa...": check --deploy's other rule
):
    from django.core.exceptions import ImproperlyConfigured

    raise ImproperlyConfigured(
        "SECRET_KEY is unset, the public development key, shorter than "
        f"{SECRET_KEY_MIN_LENGTH} characters or of fewer than 5 distinct ones, and DEBUG is off. "
        "Set the SECRET_KEY environment variable to a long random value, e.g. "
        "python3 -c 'import secrets; print(secrets.token_urlsafe(64))'."
    )
ALLOWED_HOSTS = _env_list("ALLOWED_HOSTS", "localhost,127.0.0.1,[::1],testserver")

# HTTPS and cookies (README "Configuration"). Defaults suit plain-http development; the documented
# production values (docs/operations.md) make `manage.py check --deploy` clean.
# SECURE_PROXY_SSL_HEADER: behind a TLS-terminating proxy, the header it sets (e.g.
# "X-Forwarded-Proto:https") so that Django knows the request was https; the proxy must overwrite
# that header from clients, else a client could claim https.
_ssl_header, _, _ssl_value = (part.strip() for part in _env("SECURE_PROXY_SSL_HEADER", "").partition(":"))
if _ssl_header and not _ssl_value:
    from django.core.exceptions import ImproperlyConfigured

    raise ImproperlyConfigured("SECURE_PROXY_SSL_HEADER must be 'Header:value' (X-Forwarded-Proto:https).")
_ssl_meta = "HTTP_" + _ssl_header.upper().replace("-", "_")
SECURE_PROXY_SSL_HEADER = (_ssl_meta, _ssl_value) if _ssl_header else None
SECURE_SSL_REDIRECT = _env_bool("SECURE_SSL_REDIRECT", False)
# /healthz and /readyz are probed over plain http inside the cluster: never redirected.
SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$"]
SESSION_COOKIE_SECURE = _env_bool("SESSION_COOKIE_SECURE", False)
CSRF_COOKIE_SECURE = _env_bool("CSRF_COOKIE_SECURE", False)
SECURE_HSTS_SECONDS = _env_int("SECURE_HSTS_SECONDS", 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = _env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", False)
SECURE_HSTS_PRELOAD = _env_bool("SECURE_HSTS_PRELOAD", False)
# Origins (scheme://host[:port]) the admin is reached through when that is not the request's own
# Host, e.g. https://push.example.com behind a proxy that rewrites Host.
CSRF_TRUSTED_ORIGINS = _env_list("CSRF_TRUSTED_ORIGINS", "")
SESSION_COOKIE_HTTPONLY = True
# HSTS preload (security.W021) is the domain owner's decision (submitting it to the browsers' preload
# list binds every subdomain for months), not this service's: SECURE_HSTS_PRELOAD is there for
# when it is made, and the check is not a deploy blocker.
SILENCED_SYSTEM_CHECKS = ["security.W021"]
# TRUSTED_PROXIES: CIDRs of reverse proxies / load balancers whose X-Forwarded-For names the
# client (the API-key throttle and the admin login limit count per client). Empty: the TCP peer
# is the client, and X-Forwarded-For is ignored (any client can write it).
TRUSTED_PROXIES = _env_list("TRUSTED_PROXIES", "")
for _cidr in TRUSTED_PROXIES:
    try:
        ipaddress.ip_network(_cidr, strict=False)
    except ValueError:
        from django.core.exceptions import ImproperlyConfigured

        raise ImproperlyConfigured(f"TRUSTED_PROXIES: {_cidr!r} is not an address or CIDR.") from None

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",  # swagger-ui served from our static files, not a CDN
    "axes",  # admin login throttling
    "tokens",
    "campaigns",
    "delivery",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # Static files (admin CSS, the campaign page's progress.js, swagger-ui) with DEBUG off too.
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "tokens.throttle.ApiKeyThrottleMiddleware",  # 429 for wrong API keys past a per-client limit
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Last, as django-axes asks: it turns a locked-out login into its lockout answer.
    "axes.middleware.AxesMiddleware",
]

AUTHENTICATION_BACKENDS = [
    # First, so a locked-out (username, client) is refused before the password is checked.
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]

ROOT_URLCONF = "pushsvc.urls"
WSGI_APPLICATION = "pushsvc.wsgi.application"
ASGI_APPLICATION = "pushsvc.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "pushsvc" / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "campaigns.admin_views.admin_links",
            ],
        },
    },
]

# DATABASE_URL: PostgreSQL in production, tests and CI. The default is a SQLite file so that the
# demo runs with nothing installed.
DATABASE_URL = _env("DATABASE_URL", f"sqlite:///{BASE_DIR / 'var' / 'pushsvc.sqlite3'}")
DATABASES = {
    "default": dj_database_url.parse(
        DATABASE_URL,
        # Persistent connections: the registration API and workers must not reconnect per request.
        conn_max_age=_env_int("DB_CONN_MAX_AGE", 600),
        conn_health_checks=True,
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    (BASE_DIR / "var").mkdir(exist_ok=True)
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    DATABASES["default"]["OPTIONS"] = {
        "timeout": 30,
        # WAL lets the demo's web server and workers read while one of them writes.
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        "transaction_mode": "IMMEDIATE",
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "var" / "static"
# WhiteNoise serves the app directories' static files (admin, campaigns, swagger-ui) straight from
# the finders, so no collectstatic step is needed to deploy; with collectstatic run, STATIC_ROOT
# is served as well.
WHITENOISE_USE_FINDERS = True
STATIC_ROOT.mkdir(parents=True, exist_ok=True)  # WhiteNoise warns about a missing one at startup
WHITENOISE_AUTOREFRESH = DEBUG

# Request bodies: a registration is well under 8 KiB; a campaign message under 64 KiB.
DATA_UPLOAD_MAX_MEMORY_SIZE = _env_int("DATA_UPLOAD_MAX_MEMORY_SIZE", 1024 * 1024)

# --- Redis and Celery ------------------------------------------------------------------------
REDIS_URL = _env("REDIS_URL", "redis://127.0.0.1:6379/0")
CELERY_BROKER_URL = _env("CELERY_BROKER_URL", REDIS_URL)
# Two brokers are supported (README "Choosing a broker"): Redis (the default) and RabbitMQ
# (amqp://, amqps://, pyamqp://). The options that differ are set below for the one in use.
BROKER_IS_RABBITMQ = CELERY_BROKER_URL.split("://", 1)[0] in {"amqp", "amqps", "pyamqp"}
CELERY_RESULT_BACKEND = None
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TIMEZONE = "UTC"
# At-least-once: a task is acknowledged after it ran, and a worker that dies mid-task gives it
# back to the broker instead of losing it.
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
# Send tasks are long (a shard of ~1,000 requests); prefetching more would park shards on a busy
# worker while another idles.
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# Persistent messages (Celery's default, stated): a broker that keeps its queues on disk keeps them.
CELERY_TASK_DEFAULT_DELIVERY_MODE = "persistent"
if BROKER_IS_RABBITMQ:
    # RabbitMQ: a publish returns once the broker has taken the message (publisher confirms: py-amqp
    # waits for the basic.ack; a nack raises to the publisher, a lost connection is retried by
    # Celery's publish retry; a shard whose publish failed is a pending row the recovery sweep
    # publishes later). Unacknowledged messages come back when the consumer's connection closes (a worker
    # killed outright: at once; a host that went silent: after two missed heartbeats), so there is
    # no visibility timeout to tune.
    CELERY_BROKER_TRANSPORT_OPTIONS: dict = {"confirm_publish": True}
    # Seconds between AMQP heartbeats (worker connections): a silent peer is dropped after about
    # two, and its unacknowledged messages are handed to another worker.
    CELERY_BROKER_HEARTBEAT = _env_int("CELERY_BROKER_HEARTBEAT", 30)
else:
    # Redis broker: an unacknowledged message comes back after this many seconds. It must exceed
    # the longest task (a shard) plus its longest scheduled retry countdown.
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "visibility_timeout": _env_int("CELERY_VISIBILITY_TIMEOUT", 3600),
    }
# Celery's Django fixup closes every database connection after each task unless this is set, and
# a shard task then pays a new PostgreSQL backend (fork, catalog warm-up) per 1,000 devices. Kept
# for 2 x this many tasks; pushsvc/celery.py checks them at each task start as Django does at
# each request (broken ones and those older than DB_CONN_MAX_AGE are replaced).
CELERY_DB_REUSE_MAX = _env_int("CELERY_DB_REUSE_MAX", 1000)
CELERY_WORKER_SEND_TASK_EVENTS = True
CELERY_TASK_SEND_SENT_EVENT = True
CELERY_TASK_DEFAULT_QUEUE = "default"

# One queue per provider so that a slow or paused provider never blocks another; `priority`
# carries direct (transactional) sends so they never wait behind a broadcast.
PUSH_QUEUES = tuple(spec.queue for spec in PROVIDER_SPECS)
# Webhook deliveries wait on app backends (up to WEBHOOK_TIMEOUT_S each): a queue of their own
# keeps a slow backend from delaying planning or sends.
WEBHOOK_QUEUE = "webhooks"
TASK_QUEUE_NAMES = ("default", "priority", *PUSH_QUEUES, WEBHOOK_QUEUE)
if BROKER_IS_RABBITMQ:
    # Quorum queues: replicated (Raft) and kept on disk, the queue type RabbitMQ recommends for
    # data that must not be lost. They refuse a global QoS (prefetch per channel): Celery turns it
    # off when it sees a quorum queue (worker_detect_quorum_queues, on by default, stated here), so
    # the prefetch is per consumer. Countdowns (retries, deferred shards) use Celery's native
    # delayed delivery (RabbitMQ-side delay queues, whole seconds) instead of holding the message in
    # a worker, which with a static prefetch would block it: that needs a topic exchange, hence
    # `pushsvc` (topic) with each queue bound under its own name.
    # Priorities: RabbitMQ 3.x quorum queues are FIFO (they ignore a message's priority and refuse
    # x-max-priority); RabbitMQ >= 4.0 quorum queues have two levels, priority > 4 high and 0-4 or
    # none normal, high favoured 2:1 (not strict), with no queue argument (x-max-priority must not
    # be set). docs/reliability.md "RabbitMQ" has what was measured.
    CELERY_TASK_DEFAULT_QUEUE_TYPE = "quorum"
    CELERY_WORKER_DETECT_QUORUM_QUEUES = True
    CELERY_TASK_DEFAULT_EXCHANGE = "pushsvc"
    CELERY_TASK_DEFAULT_EXCHANGE_TYPE = "topic"
    TASK_EXCHANGE = Exchange(CELERY_TASK_DEFAULT_EXCHANGE, type="topic", durable=True)
    CELERY_TASK_QUEUES = tuple(
        Queue(name, TASK_EXCHANGE, routing_key=name, durable=True, queue_arguments={"x-queue-type": "quorum"})
        for name in TASK_QUEUE_NAMES
    )
else:
    CELERY_TASK_QUEUES = tuple(Queue(name) for name in TASK_QUEUE_NAMES)
# Task routes, in one place. Send tasks choose their provider queue per call (queue=...), see
# campaigns/targeting.py queue_for; the entries below are the defaults for everything else.
CELERY_TASK_ROUTES: dict[str, dict[str, str]] = {
    "tokens.deliver_webhook": {"queue": WEBHOOK_QUEUE},
    "tokens.flush_webhooks": {"queue": WEBHOOK_QUEUE},
}
# Beat schedule: filled by the hygiene and campaign modules' entries below.
CELERY_BEAT_SCHEDULE: dict[str, dict] = {}

# --- Token hygiene (tokens/hygiene.py, tokens/invalidation.py) ---------------------------------
# Inactive tokens are kept this long before the nightly prune deletes them, so a wrongly
# deactivated user base can still be restored from its rows.
HYGIENE_PRUNE_AFTER_DAYS = _env_int("HYGIENE_PRUNE_AFTER_DAYS", 30)
# Active tokens whose last_seen is older than this are deactivated with reason "stale" (FCM calls
# a token stale after a month without contact; Android expires them after 270 days).
HYGIENE_STALE_AFTER_DAYS = _env_int("HYGIENE_STALE_AFTER_DAYS", 90)
# Deactivation audit rows (provider, campaign, reason) are kept this long for the health figures.
HYGIENE_AUDIT_RETENTION_DAYS = _env_int("HYGIENE_AUDIT_RETENTION_DAYS", 180)
# The campaign guard reports the share of a target not seen for this many days.
HYGIENE_GUARD_UNSEEN_DAYS = _env_int("HYGIENE_GUARD_UNSEEN_DAYS", 30)
# Rows per prune/sweep statement at most, and the time one such transaction should take: batches
# shrink when writes are slow (a busy server, an UPDATE that rewrites every index), and a write
# running past 3 x the target is cancelled and retried smaller, so no batch holds its row locks
# for 1 s.
HYGIENE_BATCH_SIZE = _env_int("HYGIENE_BATCH_SIZE", 5000)
HYGIENE_BATCH_TARGET_S = _env_float("HYGIENE_BATCH_TARGET_S", 0.25)
# TTL of the Redis lock that keeps two beats from running the same job; renewed after each batch,
# so it only has to outlive one batch, and frees itself soon after a crashed run.
HYGIENE_LOCK_TTL_S = _env_int("HYGIENE_LOCK_TTL_S", 60)
# Spike flag: invalid results above this share of a campaign's first N sends per provider
# (UNREGISTERED at 20 % of the first 1,000 suggests a bad import or a wrong environment).
HYGIENE_SPIKE_WINDOW = _env_int("HYGIENE_SPIKE_WINDOW", 1000)
HYGIENE_SPIKE_SHARE = _env_float("HYGIENE_SPIKE_SHARE", 0.20)
# Nightly prune and daily sweep times (UTC, "HH:MM"); staggered so they never compete.
HYGIENE_PRUNE_AT = _env("HYGIENE_PRUNE_AT", "03:15")
HYGIENE_SWEEP_AT = _env("HYGIENE_SWEEP_AT", "04:15")


def _daily_at(hhmm: str) -> crontab:
    hour, _, minute = hhmm.partition(":")
    return crontab(hour=int(hour), minute=int(minute or 0))


CELERY_BEAT_SCHEDULE.update(
    {
        "tokens-prune-inactive": {
            "task": "tokens.prune_inactive",
            "schedule": _daily_at(HYGIENE_PRUNE_AT),
            "options": {"queue": "default"},
        },
        "tokens-sweep-stale": {
            "task": "tokens.sweep_stale",
            "schedule": _daily_at(HYGIENE_SWEEP_AT),
            "options": {"queue": "default"},
        },
    }
)

# --- Webhooks (tokens/webhooks.py) ----------------------------------------------------------------
# Events are written to an outbox in the transaction of the change and delivered by the
# tokens.deliver_webhook task: WEBHOOK_TIMEOUT_S per request, at most WEBHOOK_MAX_ATTEMPTS
# attempts, the n-th retry after WEBHOOK_RETRY_BASE_S * 2^(n-1) capped at WEBHOOK_RETRY_MAX_S
# (the upper half of that range at random, so failed deliveries do not return in lockstep).
# Beat re-publishes due events every WEBHOOK_SWEEP_INTERVAL_S (a process that died between the
# commit and the publish, a broker that lost its messages). WEBHOOK_ALLOW_PRIVATE accepts URLs
# that resolve to private, loopback or link-local addresses; WEBHOOK_ALLOW_HTTP plain http.
WEBHOOK_TIMEOUT_S = _env_float("WEBHOOK_TIMEOUT_S", 10.0)
WEBHOOK_MAX_ATTEMPTS = _env_int("WEBHOOK_MAX_ATTEMPTS", 12)
WEBHOOK_RETRY_BASE_S = _env_float("WEBHOOK_RETRY_BASE_S", 10.0)
WEBHOOK_RETRY_MAX_S = _env_float("WEBHOOK_RETRY_MAX_S", 3600.0)
WEBHOOK_SWEEP_INTERVAL_S = _env_float("WEBHOOK_SWEEP_INTERVAL_S", 30.0)
WEBHOOK_BATCH_MAX = _env_int("WEBHOOK_BATCH_MAX", 1000)
WEBHOOK_ALLOW_PRIVATE = _env_bool("WEBHOOK_ALLOW_PRIVATE", False)
WEBHOOK_ALLOW_HTTP = _env_bool("WEBHOOK_ALLOW_HTTP", False)
CELERY_BEAT_SCHEDULE["tokens-flush-webhooks"] = {
    "task": "tokens.flush_webhooks",
    "schedule": WEBHOOK_SWEEP_INTERVAL_S,
    "options": {"queue": WEBHOOK_QUEUE},
}

# --- Campaigns and fan-out (campaigns/planning.py, campaigns/sending/, campaigns/tasks.py) -------
# CAMPAIGN_SHARD_SIZE: active devices per shard (one send task). CAMPAIGN_CHUNK_SIZE: devices sent
# between two checks of the campaign's pause/cancel flag and the rate limiter; a run keeps two
# chunks in flight (it sends one while it sorts the answers of the one before), so a pause takes
# effect within two chunks and a worker killed mid-run repeats at most two chunks per process.
# CAMPAIGN_MAX_ATTEMPTS: sends per device before a transient failure is dead-lettered; retries
# wait CAMPAIGN_RETRY_BASE_S * 2^(attempt-1) (jittered, at least the provider's Retry-After) up to
# CAMPAIGN_RETRY_MAX_S. CAMPAIGN_HALT_MIN_SENDS: sends before the error-rate halt is checked.
# Mass-prune guard: once CAMPAIGN_PRUNE_GUARD_MIN of the first CAMPAIGN_PRUNE_GUARD_WINDOW results
# of one provider are in, an invalid-token share above CAMPAIGN_PRUNE_GUARD_RATIO pauses the
# campaign instead of deactivating tokens.
# CAMPAIGN_SCHEDULER_INTERVAL_S: how often beat launches campaigns whose send_at has passed.
# DIRECT_SEND_MAX_RECIPIENTS: user_ids/device_ids accepted by POST /api/v1/notifications/.
# 5,000: a shard's fixed costs (its task, fetch, load, ledger transaction, and the retry shard its
# few transient failures make) were half the CPU per delivery at 1,000 (bench/campaign.py,
# docs/scaling.md); a shard still takes a worker about a second, and a pause still acts per chunk.
CAMPAIGN_SHARD_SIZE = _env_int("CAMPAIGN_SHARD_SIZE", 5000)
# 250: two chunks of 250 in flight keep the requests a run has outstanding (and so what a killed
# worker repeats, and what one connection reset cuts) where one chunk of 500 kept them, while the
# connection no longer idles through a chunk's slowest answers and its sorting (bench/campaign.py,
# docs/scaling.md). One chunk of 1,000 was faster still, but a provider resetting connections every
# 500 requests then cut re-sent requests again until they failed as "may have reached" and
# repeated (tests/reliability/test_connection_resets.py).
CAMPAIGN_CHUNK_SIZE = _env_int("CAMPAIGN_CHUNK_SIZE", 250)
CAMPAIGN_MAX_ATTEMPTS = _env_int("CAMPAIGN_MAX_ATTEMPTS", 5)
CAMPAIGN_RETRY_BASE_S = _env_float("CAMPAIGN_RETRY_BASE_S", 2.0)
CAMPAIGN_RETRY_MAX_S = _env_float("CAMPAIGN_RETRY_MAX_S", 300.0)
CAMPAIGN_HALT_MIN_SENDS = _env_int("CAMPAIGN_HALT_MIN_SENDS", 1000)
CAMPAIGN_PRUNE_GUARD_MIN = _env_int("CAMPAIGN_PRUNE_GUARD_MIN", 200)
CAMPAIGN_PRUNE_GUARD_WINDOW = _env_int("CAMPAIGN_PRUNE_GUARD_WINDOW", 1000)
CAMPAIGN_PRUNE_GUARD_RATIO = _env_float("CAMPAIGN_PRUNE_GUARD_RATIO", 0.5)
CAMPAIGN_SCHEDULER_INTERVAL_S = _env_float("CAMPAIGN_SCHEDULER_INTERVAL_S", 5.0)
# Fair sharing of the provider queues between apps and campaigns: the first CAMPAIGN_HEAD_DEVICES
# devices of each campaign and platform are published in the head lane, the rest (a broadcast's
# bulk) in the bulk lane, which a worker serves only when no head-lane shard waits. So a small
# campaign, and the start of any campaign, never waits behind another app's broadcast
# (docs/architecture.md, "Fairness"; bench/fairness.py). 0 puts everything in one lane (FIFO).
CAMPAIGN_HEAD_DEVICES = _env_int("CAMPAIGN_HEAD_DEVICES", 20_000)
# The lanes as broker priorities. kombu's Redis transport serves 0 first (a list per priority
# step). RabbitMQ serves the higher number first: quorum queues from RabbitMQ 4.0 take above 4 as
# "high" (served 2:1, not strictly first); 3.x quorum queues have no priorities, one FIFO lane.
SHARD_LANE_PRIORITIES = (9, 0) if BROKER_IS_RABBITMQ else (0, 9)
# CAMPAIGN_SHARD_LEASE_S: a running shard holds a Redis lease so that two runs of one shard never
# overlap. It is refreshed at every chunk's checkpoint and, however long a chunk takes, every
# CAMPAIGN_SHARD_LEASE_REFRESH_S by a heartbeat thread in the process that runs it
# (delivery/leases.py), so it can be short: a worker killed outright loses its leases within
# CAMPAIGN_SHARD_LEASE_S and the recovery sweep re-publishes its shards at once. Keep it at least
# three refresh periods. A run that reached no checkpoint for CAMPAIGN_SHARD_STALL_S (hung) is
# no longer refreshed and its lease runs out too.
CAMPAIGN_SHARD_LEASE_S = _env_int("CAMPAIGN_SHARD_LEASE_S", 8)
CAMPAIGN_SHARD_LEASE_REFRESH_S = _env_float("CAMPAIGN_SHARD_LEASE_REFRESH_S", 2.0)
CAMPAIGN_SHARD_STALL_S = _env_float("CAMPAIGN_SHARD_STALL_S", 120.0)
DIRECT_SEND_MAX_RECIPIENTS = _env_int("DIRECT_SEND_MAX_RECIPIENTS", 10_000)
# Shard recovery (campaigns/recovery.py): a pending shard of a running campaign that has been due
# for CAMPAIGN_RECOVERY_GRACE_S, holds no lease and whose queue is empty lost its broker message
# (a Redis restart without persistence) and is published again; one sweep per
# CAMPAIGN_RECOVERY_INTERVAL_S across all workers. A shard whose run died (its lease ran out while
# still registered, delivery/leases.py) is published again at once, whatever its queue holds: one
# check per CAMPAIGN_RECOVERY_ORPHAN_INTERVAL_S across all workers (two Redis round trips). A broker
# whose database lost its data (its mark is gone) gets every pending shard back without the grace,
# one CAMPAIGN_SHARD_LEASE_S after the loss is seen.
CAMPAIGN_RECOVERY_GRACE_S = _env_float("CAMPAIGN_RECOVERY_GRACE_S", 30.0)
CAMPAIGN_RECOVERY_INTERVAL_S = _env_float("CAMPAIGN_RECOVERY_INTERVAL_S", 10.0)
CAMPAIGN_RECOVERY_ORPHAN_INTERVAL_S = _env_float("CAMPAIGN_RECOVERY_ORPHAN_INTERVAL_S", 1.0)
# Per (app, provider) send rate shared by all workers (token bucket in Redis), in messages per
# second; 0 = unlimited. FCM publishes 600,000/min per project; APNs, HMS and Web Push publish
# no fixed quota (they answer 429/503 when pushed too hard, which the retries honour).
PUSH_RATE_LIMITS = {
    "ios": _env_float("PUSH_RATE_LIMIT_APNS", 0),
    "android": _env_float("PUSH_RATE_LIMIT_FCM", 600_000 / 60),
    "huawei": _env_float("PUSH_RATE_LIMIT_HMS", 0),
    "web": _env_float("PUSH_RATE_LIMIT_WEBPUSH", 0),
}
# Circuit breaker per (app, provider) (delivery/breaker.py): a chunk with at least
# BREAKER_FAILURE_RATIO (and BREAKER_MIN_FAILURES) of its answers 5xx or unanswered opens it; no
# shard of the app sends to that provider for BREAKER_OPEN_S (doubling per failed probe up to
# BREAKER_OPEN_MAX_S), then one probe of BREAKER_PROBE_SIZE devices decides. A probe not reported
# within BREAKER_PROBE_TTL_S (its sender died) is given to another caller. A shard waits in place
# for at most BREAKER_SLEEP_MAX_S, else it is deferred (re-queued for when the breaker may close).
# After BREAKER_PAUSE_AFTER_S of outage the campaign pauses with the reason (0 = never).
BREAKER_FAILURE_RATIO = _env_float("BREAKER_FAILURE_RATIO", 0.5)
BREAKER_MIN_FAILURES = _env_int("BREAKER_MIN_FAILURES", 10)
BREAKER_OPEN_S = _env_float("BREAKER_OPEN_S", 2.0)
BREAKER_OPEN_MAX_S = _env_float("BREAKER_OPEN_MAX_S", 15.0)
BREAKER_PROBE_SIZE = _env_int("BREAKER_PROBE_SIZE", 20)
BREAKER_PROBE_TTL_S = _env_float("BREAKER_PROBE_TTL_S", 30.0)  # > PUSH_REQUEST_TIMEOUT
BREAKER_SLEEP_MAX_S = _env_float("BREAKER_SLEEP_MAX_S", 2.0)
BREAKER_PAUSE_AFTER_S = _env_float("BREAKER_PAUSE_AFTER_S", 900.0)
# PUSH_EVENT_LOOP: "uvloop" or "asyncio", the loop each worker process runs its providers on
# (uvloop: ~10% less worker CPU per request in bench/campaign.py).
PUSH_EVENT_LOOP = _env("PUSH_EVENT_LOOP", "uvloop")
CELERY_TASK_ROUTES.update(
    {
        "delivery.tasks.plan_campaign": {"queue": "default"},
        "delivery.tasks.launch_due_campaigns": {"queue": "default"},
    }
)
CELERY_BEAT_SCHEDULE["launch-due-campaigns"] = {
    "task": "delivery.tasks.launch_due_campaigns",
    "schedule": CAMPAIGN_SCHEDULER_INTERVAL_S,
}

# --- Idempotent requests (campaigns/idempotent.py) -------------------------------------------
# An Idempotency-Key on POST /api/v1/notifications/ or /campaigns/ is kept IDEMPOTENCY_TTL_S
# (24 h): a retry with the same key and body gets the first answer and sends nothing. A request
# still running holds its key IDEMPOTENCY_LOCK_S; a duplicate meanwhile answers 409. Past that, a
# claim that created no campaign (its request died) is taken over by the next retry, and one that
# did is answered from its campaign. Expired keys are deleted by beat every
# IDEMPOTENCY_EXPIRE_INTERVAL_S (an expired key is already free before that).
IDEMPOTENCY_TTL_S = _env_int("IDEMPOTENCY_TTL_S", 24 * 3600)
IDEMPOTENCY_LOCK_S = _env_int("IDEMPOTENCY_LOCK_S", 60)
IDEMPOTENCY_EXPIRE_INTERVAL_S = _env_float("IDEMPOTENCY_EXPIRE_INTERVAL_S", 3600.0)
CELERY_TASK_ROUTES["campaigns.expire_idempotency_keys"] = {"queue": "default"}
CELERY_BEAT_SCHEDULE["campaigns-expire-idempotency-keys"] = {
    "task": "campaigns.expire_idempotency_keys",
    "schedule": IDEMPOTENCY_EXPIRE_INTERVAL_S,
    "options": {"queue": "default"},
}

# --- Provider endpoints and trust --------------------------------------------------------------
# Production values by default; tests and the demo point them at the simulator.
APNS_ENDPOINT_PRODUCTION = _env("APNS_ENDPOINT_PRODUCTION", "https://api.push.apple.com")
APNS_ENDPOINT_SANDBOX = _env("APNS_ENDPOINT_SANDBOX", "https://api.sandbox.push.apple.com")
FCM_ENDPOINT = _env("FCM_ENDPOINT", "https://fcm.googleapis.com")
HMS_ENDPOINT = _env("HMS_ENDPOINT", "https://push-api.cloud.huawei.com")
HMS_TOKEN_URL = _env("HMS_TOKEN_URL", "https://oauth-login.cloud.huawei.com/oauth2/v3/token")
# CA bundle used to verify provider TLS (empty: the system store). The simulator's CA in tests.
PUSH_CA_BUNDLE = _env("PUSH_CA_BUNDLE", "")
# Web Push subscription endpoints come from clients: only these hosts (suffix match) are accepted.
WEBPUSH_ALLOWED_HOSTS = _env_list(
    "WEBPUSH_ALLOWED_HOSTS",
    "fcm.googleapis.com,updates.push.services.mozilla.com,push.services.mozilla.com,"
    "web.push.apple.com,notify.windows.com,push.api.chromium.org",
)
# Web Push: allow plain http and private addresses (the local simulator). Never in production.
WEBPUSH_ALLOW_INSECURE = _env_bool("WEBPUSH_ALLOW_INSECURE", False)
# Connections per (provider, credential) pool and the request timeout, in seconds.
PUSH_CONNECTIONS_PER_POOL = _env_int("PUSH_CONNECTIONS_PER_POOL", 2)
PUSH_REQUEST_TIMEOUT = _env_float("PUSH_REQUEST_TIMEOUT", 15.0)
# A pooled provider connection idle for longer than this many seconds is closed and replaced at the
# next send instead of reused (curl engine). Providers and the load balancers before them drop idle
# HTTP/2 connections, not always visibly (a forgotten NAT entry answers nothing): keep it below the
# shortest idle timeout on the path. 60 s costs one TLS handshake per minute of silence.
PUSH_CONNECTION_IDLE_MAX_S = _env_int("PUSH_CONNECTION_IDLE_MAX_S", 60)

# --- Registration API -------------------------------------------------------------------------
# A verified API key is cached per web process this many seconds (revocation is immediate in the
# revoking process, within this window elsewhere).
API_KEY_CACHE_SECONDS = _env_float("API_KEY_CACHE_SECONDS", 5.0)
# Keys that do not verify, per client address and per (client, key prefix) and window, before
# such requests answer 429 instead of 401 (tokens/throttle.py). A key that verifies is never refused.
API_AUTH_FAILURES_MAX = _env_int("API_AUTH_FAILURES_MAX", 20)
API_AUTH_KEY_FAILURES_MAX = _env_int("API_AUTH_KEY_FAILURES_MAX", 10)
API_AUTH_FAILURE_WINDOW_S = _env_int("API_AUTH_FAILURE_WINDOW_S", 60)

# --- Admin login throttling (django-axes) -------------------------------------------------------
# ADMIN_LOGIN_FAILURES_MAX wrong passwords for one username from one client lock that pair out for
# ADMIN_LOGIN_LOCKOUT_S (429); a success resets the count. Keyed on the pair, so an attacker can
# neither lock an admin out from elsewhere nor lock out everyone behind one proxy. Failures are
# rows in the database (axes' tables), shared by every web process.
AXES_FAILURE_LIMIT = _env_int("ADMIN_LOGIN_FAILURES_MAX", 5)
AXES_COOLOFF_TIME = timedelta(seconds=_env_int("ADMIN_LOGIN_LOCKOUT_S", 900))
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
AXES_CLIENT_IP_CALLABLE = "tokens.throttle.login_client_ip"
AXES_VERBOSE = False
# Registrations commit without waiting for the WAL flush: a PostgreSQL crash may lose the last
# fraction of a second of them, and apps register again on their next launch. `true` waits.
REGISTRY_SYNCHRONOUS_COMMIT = _env_bool("REGISTRY_SYNCHRONOUS_COMMIT", False)
# Server-side prepared statements for the upsert; turn off behind PgBouncer in transaction mode.
REGISTRY_PREPARED_STATEMENTS = _env_bool("REGISTRY_PREPARED_STATEMENTS", True)
# PostgreSQL: the device table is hash-partitioned on (app_id, device_id) into this many
# partitions (docs/scaling.md, "The partitioned registry"). Read once, by the migration that
# partitions the table (tokens 0007); changing it later means re-partitioning, not a restart.
REGISTRY_PARTITIONS = _env_int("REGISTRY_PARTITIONS", 16)

# --- REST framework ---------------------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["tokens.auth.ApiKeyAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["tokens.auth.HasApiKey"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["pushsvc.api.JSONParser"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "pushsvc.api.exception_handler",
    "UNAUTHENTICATED_USER": None,
}
SPECTACULAR_SETTINGS = {
    "TITLE": "pushsvc API",
    "DESCRIPTION": "Push notification gateway: device registry, campaigns and direct sends.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SERVE_PERMISSIONS": ["rest_framework.permissions.AllowAny"],
    "SERVE_AUTHENTICATION": [],
    # swagger-ui from drf-spectacular-sidecar's static files, not a CDN's @latest.
    "SWAGGER_UI_DIST": "SIDECAR",
    # A topic send's `platforms` (FCM, HMS) is a subset of the devices' platforms: both sets named,
    # so that two `platforms` fields with different choices do not collide (drf_spectacular.W001).
    "ENUM_NAME_OVERRIDES": {
        "PlatformEnum": ["ios", "android", "huawei", "web"],  # tokens.models.Platform
        "TopicPlatformEnum": ["android", "huawei"],
    },
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
}

# --- Logging ----------------------------------------------------------------------------------
LOG_LEVEL = _env("LOG_LEVEL", "INFO")
LOG_JSON = _env_bool("LOG_JSON", False)
# pushsvc/logging.py: campaign/shard/provider on every record, secrets masked, JSON lines with
# LOG_JSON=true; the same on Celery workers' handlers.
LOGGING = _logging.logging_config(LOG_LEVEL, LOG_JSON)
_logging.use_in_celery(LOG_JSON)

# --- Operations (pushsvc/metrics.py, pushsvc/health.py, campaigns/admin.py) -----------------------
# METRICS_TOKEN: /metrics wants "Authorization: Bearer <token>". Without a token /metrics answers
# 403 unless METRICS_PUBLIC=true opens it (it names tenants, campaigns and volumes).
# FLOWER_URL: where the admin's Flower link points.
METRICS_TOKEN = _env("METRICS_TOKEN", "")
METRICS_PUBLIC = _env_bool("METRICS_PUBLIC", False)
FLOWER_URL = _env("FLOWER_URL", "http://127.0.0.1:5555")
