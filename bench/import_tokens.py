"""Benchmark: `manage.py import_tokens` of a large CSV into a new app, rows/s and peak RSS.

    .venv/bin/python bench/import_tokens.py [--rows 1000000] [--runs 3] [--csv /tmp/tokens_1m.csv]
        [--database postgres://postgres@127.0.0.1:5432/bench_import] [--verbosity 2] [--reimport]

The CSV is written by `tokens.testing.write_tokens_csv` (seed 0) unless the file exists with that
many rows. Each run recreates the benchmark database (dropped, created, migrated), creates an app
and imports the file with the real command in a child process under `/usr/bin/time -v`, so the
figures include start-up, COPY, the upsert, the commit and the ANALYZE, and the peak RSS is the
command's own. With --reimport each run then imports the file again into the same app (every
device known: the update path). Prints each run's rows/s, wall time and peak RSS, then the
medians, with the load average before each run: the machine may be shared, and the figures move
with what else runs.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


from bench.campaign import recreate_database  # noqa: E402  (after the sys.path insert above)


def ensure_csv(path: Path, rows: int) -> None:
    if path.exists():
        with path.open("rb") as handle:
            if sum(1 for _ in handle) == rows + 1:  # with its header line
                return
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "pushsvc.settings")
    import django

    django.setup()
    from tokens.testing import write_tokens_csv

    write_tokens_csv(str(path), rows)


def manage(env: dict[str, str], *args: str, timed: bool = False) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "manage.py"), *args]
    if timed:
        command = ["/usr/bin/time", "-v", *command]
    # From the checkout's own directory: Django finds the command's module through the current one.
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--csv", default=None, help="default: /tmp/tokens_<rows>.csv")
    parser.add_argument("--database", default="postgres://postgres@127.0.0.1:5432/bench_import")
    parser.add_argument("--verbosity", type=int, default=1, help="2 prints the command's phases")
    parser.add_argument(
        "--reimport", action="store_true", help="then import the file again: every device known (updates)"
    )
    args = parser.parse_args()

    path = Path(args.csv or f"/tmp/tokens_{args.rows}.csv")
    ensure_csv(path, args.rows)
    env = {**os.environ, "DATABASE_URL": args.database}
    rates: list[int] = []
    again: list[int] = []
    rss: list[float] = []
    for run in range(1, args.runs + 1):
        recreate_database(args.database)
        for step in (("migrate", "-v0"), ("create_app", "--slug", "bench", "--name", "bench", "-v0")):
            done = manage(env, *step)
            if done.returncode:
                sys.exit(f"{' '.join(step)} failed:\n{done.stdout}{done.stderr}")
        for name, series in (("new app", rates), ("re-import", again))[: 2 if args.reimport else 1]:
            load = os.getloadavg()[0]
            done = manage(
                env, "import_tokens", str(path), "--app", "bench", f"-v{args.verbosity}", timed=True
            )
            rate = re.search(r"= ([\d,]+) rows/s", done.stdout)
            peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
            wall = re.search(r"in ([\d.]+) s =", done.stdout)
            if done.returncode or not (rate and peak and wall):
                sys.exit(f"import failed:\n{done.stdout}{done.stderr}")
            series.append(int(rate.group(1).replace(",", "")))
            rss.append(int(peak.group(1)) / 1024)
            if args.verbosity >= 2:
                print(done.stdout.rstrip())
            print(
                f"run {run}, {name}: {series[-1]:,} rows/s ({wall.group(1)} s), peak RSS {rss[-1]:.0f} MB, "
                f"load average before {load:.2f}",
                flush=True,
            )
    for name, series in (("new app", rates), ("re-import", again)):
        if series:
            print(f"median of {len(series)}, {name}: {statistics.median(series):,.0f} rows/s")
    print(f"peak RSS at most {max(rss):.0f} MB ({args.rows:,} rows from {path})")


if __name__ == "__main__":
    main()
