"""How long `mssd annuaire import FILE` takes for a large extraction file.

Writes a synthetic, fictitious extraction file (tests/annuaire_population.py) of
``--lines`` mailboxes, creates a fresh store, then runs the real command
(``python -m mssd annuaire import``, a new process each time) ``--runs`` times:
the first run loads an empty store, the following ones replace the previous
import (the idempotent re-import). Reports each run's wall time and the median.

    .venv/bin/python bench/annuaire_import.py --backend sqlite --lines 100000 --runs 3
    .venv/bin/python bench/annuaire_import.py --backend postgresql --lines 100000 --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from annuaire_population import population, write_extraction  # noqa: E402

ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


async def _postgres(statement: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(os.environ.get("MSSD_BENCH_POSTGRES_DSN", ADMIN_URL))
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


def mssd(env: dict[str, str], *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "mssd", *args], env=env, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise SystemExit(f"mssd {' '.join(args)} failed:\n{result.stderr}")
    return result.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--lines", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mssd-bench-annuaire-") as tmp:
        directory = Path(tmp)
        started = time.monotonic()
        # Unlisted mailboxes are absent from the public file: generate a few more.
        listed = [p for p in population(args.lines * 105 // 100 + 100) if not p.liste_rouge]
        people = listed[: args.lines]
        extraction = directory / "Extraction_Correspondance_MSSante.txt"
        write_extraction(extraction, people)
        lines = sum(1 for _ in extraction.open("rb")) - 1
        print(
            f"extraction file: {lines} lines, {extraction.stat().st_size / 1e6:.1f} MB "
            f"(written in {time.monotonic() - started:.1f} s)"
        )
        database = ""
        if args.backend == "sqlite":
            url = f"sqlite+aiosqlite:///{directory / 'mssd.db'}"
        else:
            database = f"mssd_bench_{secrets.token_hex(4)}"
            asyncio.run(_postgres(f'CREATE DATABASE "{database}"'))
            url = f"postgresql+asyncpg://postgres@127.0.0.1:5432/{database}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("MSSD_")}
        env["MSSD_STORE_URL"] = url
        try:
            mssd(env, "db", "upgrade")
            timings = []
            for run in range(args.runs):
                begin = time.monotonic()
                out = mssd(env, "annuaire", "import", str(extraction))
                elapsed = time.monotonic() - begin
                timings.append(elapsed)
                print(f"run {run + 1}: {elapsed:.2f} s  ({out.splitlines()[0]})")
            print(
                f"{args.backend}: median {statistics.median(timings):.2f} s for {lines} lines "
                f"({lines / statistics.median(timings):,.0f} lines/s), process start included"
            )
        finally:
            if database:
                asyncio.run(_postgres(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))


if __name__ == "__main__":
    main()
