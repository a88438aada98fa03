"""`python -m simulator`: the provider simulator without Django (same options as `manage.py run_simulator`).

It needs no settings, database or secret key: it is a stand-in for Apple, Google, Huawei and a push
service, and the test helper (simulator/testing.py) starts it this way.
"""

from __future__ import annotations

import argparse
import logging

from simulator.server import add_arguments, main, main_options


def cli(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m simulator",
        description="Run the provider simulator (APNs, FCM v1, HMS, Web Push) over HTTP/2.",
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        kwargs = main_options(vars(args))
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    main(**kwargs)


if __name__ == "__main__":
    cli()
