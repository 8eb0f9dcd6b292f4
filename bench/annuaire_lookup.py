"""Lookup latency of the directory resolver, LDAP and FHIR, cold and warm cache.

Starts a real slapd (tests/annuaire_servers.py; 10,000 fictitious mailboxes by
default) and the HTTPS stand-in for the Annuaire Santé FHIR API
(tests/annuaire_fhir_server.py), a fresh store (SQLite, or PostgreSQL with
``--backend postgresql``) for the shared cache, then for each backend looks up
``--lookups`` distinct addresses through the resolver as mssd uses it:

- cold: the cache is empty, every lookup goes to the directory and writes the cache;
- warm: the same addresses again, every answer from the cache.

Reports p50/p99/max in milliseconds, per backend and phase.

    .venv/bin/python bench/annuaire_lookup.py --entries 10000 --lookups 500
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from annuaire_fhir_server import FhirServer  # noqa: E402
from annuaire_population import population, write_ldif  # noqa: E402
from annuaire_servers import BASE_DN, Slapd  # noqa: E402

from mssd.annuaire.cache import StoreCache  # noqa: E402
from mssd.annuaire.fhir import FhirBackend, FhirConfig  # noqa: E402
from mssd.annuaire.ldap import LdapBackend, LdapConfig  # noqa: E402
from mssd.annuaire.resolver import Backend, Resolver, ResolverPolicy  # noqa: E402
from mssd.store.engine import create_engine, upgrade  # noqa: E402
from mssd.trust.pki import init_dev_pki  # noqa: E402


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


async def measure(backend: Backend, url: str, addresses: list[str]) -> dict[str, list[float]]:
    engine = create_engine(url)
    await upgrade(engine)
    resolver = Resolver([backend], cache=StoreCache(engine), policy=ResolverPolicy())
    timings: dict[str, list[float]] = {"cold": [], "warm": []}
    try:
        for phase in ("cold", "warm"):
            for address in addresses:
                started = time.perf_counter()
                answer = await resolver.lookup_address(address)
                timings[phase].append((time.perf_counter() - started) * 1000)
                if answer.status != "found":
                    raise SystemExit(f"{address}: {answer.status} {answer.reason}")
        assert resolver.counters.cache_hits == len(addresses)
    finally:
        await resolver.close()
        await engine.dispose()
    return timings


async def _postgres(statement: str) -> None:
    import asyncpg

    conn = await asyncpg.connect("postgresql://postgres@127.0.0.1:5432/postgres")
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--entries", type=int, default=10_000)
    parser.add_argument("--lookups", type=int, default=500)
    parser.add_argument("--backend", choices=("sqlite", "postgresql"), default="sqlite")
    args = parser.parse_args()
    people = population(args.entries)
    listed = [p for p in people if not p.liste_rouge]
    addresses = [p.address for p in random.Random(5).sample(listed, args.lookups)]
    with tempfile.TemporaryDirectory(prefix="mssd-bench-lookup-") as tmp:
        directory = Path(tmp)
        pki = init_dev_pki(directory / "pki")
        ldif = directory / "population.ldif"
        write_ldif(ldif, people, BASE_DN)
        (directory / "slapd").mkdir()
        slapd = Slapd(directory / "slapd", pki.server_cert, pki.server_key, pki.ca_bundle)
        slapd.configure(ldif)
        slapd.start()
        fhir = FhirServer(people, pki.server_cert, pki.server_key)
        databases: list[str] = []

        def store_url(name: str) -> str:
            if args.backend == "sqlite":
                return f"sqlite+aiosqlite:///{directory / name}.db"
            database = f"mssd_bench_{secrets.token_hex(4)}"
            asyncio.run(_postgres(f'CREATE DATABASE "{database}"'))
            databases.append(database)
            return f"postgresql+asyncpg://postgres@127.0.0.1:5432/{database}"

        try:
            results = {}
            ldap = LdapBackend(
                LdapConfig(
                    url=slapd.ldap_url, base_dn=BASE_DN, starttls=True, ca_file=pki.ca_bundle
                )
            )
            results["ldap"] = asyncio.run(measure(ldap, store_url("ldap"), addresses))
            backend = FhirBackend(
                FhirConfig(url=fhir.url, api_key=fhir.api_key, ca_file=pki.ca_bundle)
            )
            results["fhir"] = asyncio.run(measure(backend, store_url("fhir"), addresses))
        finally:
            fhir.close()
            slapd.stop()
            for database in databases:
                asyncio.run(_postgres(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
    print(
        f"{args.lookups} lookups by address, {len(people)} entries, cache in {args.backend}, "
        f"{os.cpu_count()} CPUs"
    )
    print(f"{'backend':8} {'cache':5} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'mean ms':>8}")
    for name, timings in results.items():
        for phase, values in timings.items():
            print(
                f"{name:8} {phase:5} {percentile(values, 0.5):8.2f} {percentile(values, 0.99):8.2f}"
                f" {max(values):8.2f} {statistics.fmean(values):8.2f}"
            )


if __name__ == "__main__":
    main()
