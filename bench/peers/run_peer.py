"""One peer's run for bench/peers.py, executed by the peers' virtualenv (var/peers/venv):

    var/peers/venv/bin/python bench/peers/run_peer.py {dpn|send_each} --base-url URL --ca CA
        --workdir DIR --tokens FILE

`dpn`: django-push-notifications 3.3.0 the way its users send a broadcast: the devices are rows of
its models and `APNSDevice.objects.all().send_message(...)` / `GCMDevice.objects.all()
.send_message(...)` (aioapns for APNs, firebase-admin send_each for FCM). `send_each`: the Firebase
Admin SDK alone, `messaging.send_each` over the FCM tokens in its maximum batches of 500.

Pointing them at the simulator: neither has an endpoint setting. aioapns connects to its protocol
classes' APNS_SERVER/APNS_PORT and firebase-admin posts to `_MessagingService.FCM_URL`; both are
class attributes, set here before the first send. TLS trust: SSL_CERT_FILE (aioapns' default SSL
context) and REQUESTS_CA_BUNDLE (firebase-admin's requests session) name the simulator's CA. The
OAuth token comes from the service account's token_uri, which the simulator's account sets to
itself (google-auth addresses its assertion to Google's endpoint whatever token_uri says: that
module constant is pointed at the simulator too). Prints one JSON line: seconds, requests
attempted and the peer's own success count.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("peer", choices=("dpn", "send_each"))
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--tokens", required=True, help="CSV platform,token")
    parser.add_argument("--key-p8", required=True)
    parser.add_argument("--key-id", required=True)
    parser.add_argument("--team-id", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--service-account", required=True, help="path of the service account JSON")
    args = parser.parse_args()

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    os.environ["SSL_CERT_FILE"] = args.ca
    os.environ["REQUESTS_CA_BUNDLE"] = args.ca
    url = urlsplit(args.base_url)

    from aioapns import connection as aioapns_connection
    from firebase_admin import messaging

    aioapns_connection.APNsProductionClientProtocol.APNS_SERVER = url.hostname
    aioapns_connection.APNsProductionClientProtocol.APNS_PORT = url.port
    messaging._MessagingService.FCM_URL = args.base_url + "/v1/projects/{0}/messages:send"

    import firebase_admin
    from firebase_admin import credentials
    from google.oauth2 import service_account

    # google-auth signs its assertion for Google's fixed token endpoint; the simulator (like the
    # OAuth spec) wants the token_uri it is posted to.
    service_account._GOOGLE_OAUTH2_TOKEN_ENDPOINT = args.base_url + "/token"

    firebase_admin.initialize_app(credentials.Certificate(args.service_account))

    with open(args.tokens) as handle:
        rows = list(csv.reader(handle))
    ios = [t for p, t in rows if p == "ios"]
    android = [t for p, t in rows if p == "android"]

    if args.peer == "send_each":
        message = messaging.Message(notification=messaging.Notification(title="Bench", body="hi"))
        ok = 0
        t0 = time.perf_counter()
        for lo in range(0, len(android), 500):
            batch = [
                messaging.Message(notification=message.notification, token=token)
                for token in android[lo : lo + 500]
            ]
            ok += messaging.send_each(batch).success_count
        seconds = time.perf_counter() - t0
        print(json.dumps({"seconds": seconds, "attempted": len(android), "ok": ok}))
        return

    os.environ.update(
        {
            "DJANGO_SETTINGS_MODULE": "settings",
            "PEER_DB": str(work / "dpn.sqlite3"),
            "PEER_APNS_KEY_PATH": args.key_p8,
            "PEER_APNS_KEY_ID": args.key_id,
            "PEER_APNS_TEAM_ID": args.team_id,
            "PEER_APNS_TOPIC": args.topic,
        }
    )
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    Path(os.environ["PEER_DB"]).unlink(missing_ok=True)
    import django

    django.setup()
    from django.core.management import call_command
    from push_notifications.gcm import dict_to_fcm_message
    from push_notifications.models import APNSDevice, GCMDevice

    call_command("migrate", verbosity=0)
    APNSDevice.objects.bulk_create((APNSDevice(registration_id=t) for t in ios), batch_size=5000)
    GCMDevice.objects.bulk_create(
        (GCMDevice(registration_id=t, cloud_message_type="FCM") for t in android), batch_size=5000
    )

    t0 = time.perf_counter()
    apns_error = ""
    try:
        apns_results = APNSDevice.objects.all().send_message("Bench: hi")
    except Exception as exc:  # the package raises APNSError when any one device failed
        apns_results, apns_error = [], f"{type(exc).__name__}: {str(exc)[:200]}"
    apns_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    fcm = GCMDevice.objects.all().send_message(dict_to_fcm_message({"title": "Bench", "body": "hi"}))
    fcm_s = time.perf_counter() - t1
    apns_ok = sum(1 for batch in apns_results for v in batch.values() if v == "Success")
    fcm_ok = fcm.success_count
    still_active = (
        APNSDevice.objects.filter(active=True).count() + GCMDevice.objects.filter(active=True).count()
    )
    print(
        json.dumps(
            {
                "seconds": apns_s + fcm_s,
                "apns_s": apns_s,
                "fcm_s": fcm_s,
                "attempted": len(ios) + len(android),
                "ok": apns_ok + fcm_ok,
                "apns_ok": apns_ok,
                "fcm_ok": fcm_ok,
                "deactivated": len(ios) + len(android) - still_active,
                "apns_error": apns_error,
            }
        )
    )


if __name__ == "__main__":
    main()
