"""The smallest Django project that runs django-push-notifications (bench/peers/run_peer.py).

Credentials and the database path come from the environment that run_peer.py sets from the
simulator; nothing here is pushsvc's.
"""

import os

SECRET_KEY = "peer-benchmark"
INSTALLED_APPS = ["django.contrib.contenttypes", "django.contrib.auth", "push_notifications"]
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": os.environ["PEER_DB"]}}
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
PUSH_NOTIFICATIONS_SETTINGS = {
    "APNS_AUTH_KEY_PATH": os.environ["PEER_APNS_KEY_PATH"],
    "APNS_AUTH_KEY_ID": os.environ["PEER_APNS_KEY_ID"],
    "APNS_TEAM_ID": os.environ["PEER_APNS_TEAM_ID"],
    "APNS_TOPIC": os.environ["PEER_APNS_TOPIC"],
    "APNS_USE_SANDBOX": False,
    # firebase-admin's send_each takes at most 500 messages; the package's default (1,000) makes
    # every bulk send of more than 500 devices raise ValueError.
    "FCM_MAX_RECIPIENTS": 500,
}
