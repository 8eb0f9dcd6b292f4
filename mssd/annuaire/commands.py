"""``mssd annuaire ...``: lookup, search, import, set, publish.

The argparse wiring and the commands; ``mssd.cli`` attaches them and turns
:class:`BadInput` (exit 2) and :class:`Failed` (exit 1) into its messages.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from mssd.annuaire.build import build_resolver
from mssd.annuaire.extraction import ExtractionError
from mssd.annuaire.model import (
    BAL_TYPES,
    DirectoryConfigError,
    DirectoryEntry,
    DirectoryError,
    Lookup,
    SearchQuery,
    parse_yes_no,
)
from mssd.config import Settings
from mssd.store.engine import create_engine
from mssd.trust.idnat import IdNatError, check_idnat_ps, check_rpps
from mssd.trust.whitelist import mailbox_key


class BadInput(Exception):
    """Bad input on the command line or in a file (exit status 2)."""


class Failed(Exception):
    """The directory refused or could not be reached (exit status 1)."""


def _yes_no(value: str) -> bool:
    flag = parse_yes_no(value)
    if flag is not None:
        return flag
    raise argparse.ArgumentTypeError(f"expected yes or no, got {value!r}")


def add_parser(sub: Any) -> argparse.ArgumentParser:
    annuaire = sub.add_parser("annuaire", help="the national health directory")
    asub = annuaire.add_subparsers(dest="annuaire_command", required=True)
    lookup = asub.add_parser("lookup", help="a mailbox by address, or a professional's mailboxes")
    lookup.add_argument("address", nargs="?")
    lookup.add_argument("--idnat", help="idNat_PS (8+RPPS or 0+ADELI)")
    lookup.add_argument("--rpps", help="RPPS number (11 digits)")
    lookup.add_argument("--json", action="store_true", help="print the entries as JSON")
    search = asub.add_parser("search", help="address-book search (every criterion must match)")
    search.add_argument("--name", default="", help="last name, from its start")
    search.add_argument("--first-name", default="")
    search.add_argument("--profession", default="", help="TRE_G15 code (10, 21...) or label")
    search.add_argument("--city", default="")
    search.add_argument("--postcode", default="")
    search.add_argument("--type", default="", choices=("", *BAL_TYPES))
    search.add_argument(
        "--limit", type=_positive, help="most entries (default annuaire.search_limit)"
    )
    search.add_argument("--json", action="store_true")
    load = asub.add_parser("import", help="load the extraction file (replaces the previous one)")
    load.add_argument("file")
    settings = asub.add_parser("set", help="directory settings of one of our mailboxes")
    settings.add_argument("address")
    settings.add_argument("--liste-rouge", type=_yes_no, metavar="yes|no")
    settings.add_argument("--dematerialisation", type=_yes_no, metavar="yes|no")
    for option in ("--description", "--responsible", "--service", "--phone"):
        settings.add_argument(option)
    publish = asub.add_parser("publish", help="publish our mailboxes to the directory")
    publish.add_argument("--dry-run", action="store_true", help="print the payloads only")
    return annuaire  # type: ignore[no-any-return]


def entry_line(entry: DirectoryEntry) -> str:
    place = " ".join(p for p in (entry.postcode, entry.city) if p)
    return "\t".join(
        [
            entry.address,
            entry.bal_type or "-",
            entry.idnat_ps or "-",
            entry.display_name(),
            entry.profession_label or entry.profession_code or "-",
            entry.structure_name or "-",
            place or "-",
            entry.source,
        ]
    )


def _print_answer(answer: Lookup, as_json: bool, elapsed: float) -> None:
    if answer.status == "unknown":
        raise Failed(f"directory: unknown ({answer.reason})")
    if answer.status == "not_found":
        raise Failed("directory: not found" + (f" ({answer.reason})" if answer.reason else ""))
    if as_json:
        print(json.dumps([e.to_json() for e in answer.entries], ensure_ascii=False, indent=2))
        return
    for entry in answer.entries:
        print(entry_line(entry))
    print(
        f"{len(answer.entries)} entr{'y' if len(answer.entries) == 1 else 'ies'} "
        f"from {answer.source} in {elapsed * 1000:.0f} ms"
    )


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"a whole number of 1 or more, got {text!r}")
    return value


async def run(settings: Settings, args: argparse.Namespace, actor: str) -> None:
    engine = create_engine(settings.store.url)
    try:
        await _run(settings, args, actor, engine)
    finally:
        await engine.dispose()


async def _run(
    settings: Settings, args: argparse.Namespace, actor: str, engine: AsyncEngine
) -> None:
    command = args.annuaire_command
    if command == "import":
        await _import(engine, Path(args.file), actor)
    elif command == "set":
        await _set(engine, args, actor)
    elif command == "publish":
        from mssd.annuaire.publish import run_publication

        try:
            await run_publication(settings, engine, dry_run=args.dry_run, actor=actor, out=print)
        except DirectoryConfigError as error:
            raise BadInput(str(error)) from None
        except DirectoryError as error:
            raise Failed(str(error)) from None
    else:
        try:
            resolver = build_resolver(settings.annuaire, engine)
        except DirectoryConfigError as error:
            raise BadInput(str(error)) from None
        except DirectoryError as error:
            raise Failed(str(error)) from None
        started = time.monotonic()
        try:
            if command == "lookup":
                answer = await _lookup(resolver, args)
            else:
                query = SearchQuery(
                    name=args.name,
                    first_name=args.first_name,
                    profession=args.profession,
                    city=args.city,
                    postcode=args.postcode,
                    bal_type=args.type,
                )
                if query.is_empty():
                    raise BadInput(
                        "give at least one of --name, --first-name, --profession, "
                        "--city, --postcode, --type"
                    )
                answer = await resolver.search(query, args.limit)
        finally:
            await resolver.close()
        _print_answer(answer, args.json, time.monotonic() - started)


async def _lookup(resolver: Any, args: argparse.Namespace) -> Lookup:
    given = [v for v in (args.address, args.idnat, args.rpps) if v]
    if len(given) != 1:
        raise BadInput("give one of ADDRESS, --idnat or --rpps")
    if args.address:
        if "@" not in args.address:
            raise BadInput(f"{args.address!r} is not a mail address")
        return await resolver.lookup_address(args.address)  # type: ignore[no-any-return]
    if args.idnat:
        try:
            check_idnat_ps(args.idnat)
        except IdNatError as error:
            raise BadInput(str(error)) from None
        return await resolver.lookup_idnat_ps(args.idnat)  # type: ignore[no-any-return]
    try:
        check_rpps(args.rpps)
    except IdNatError as error:
        raise BadInput(f"--rpps: {error}") from None
    return await resolver.lookup_rpps(args.rpps)  # type: ignore[no-any-return]


async def _import(engine: AsyncEngine, path: Path, actor: str) -> None:
    from mssd.annuaire.offline import import_file

    started = time.monotonic()
    try:
        report, stats = await import_file(engine, path, actor=actor)
    except OSError as error:
        raise BadInput(f"{path}: {error.strerror or error}") from None
    except ExtractionError as error:
        raise BadInput(f"{path}: {error}; nothing was imported") from None
    print(
        f"{report.entries} mailboxes imported from {path} in "
        f"{time.monotonic() - started:.1f} s (replacing {report.replaced})"
    )
    if stats.duplicates:
        print(
            f"{stats.duplicates} duplicate line(s) skipped, the first kept: "
            + "; ".join(stats.duplicate_examples)
        )


async def _set(engine: AsyncEngine, args: argparse.Namespace, actor: str) -> None:
    from mssd.store.annuaire import SettingError, set_mailbox_settings

    changes = {
        name: getattr(args, name)
        for name in (
            "liste_rouge",
            "dematerialisation",
            "description",
            "responsible",
            "service",
            "phone",
        )
        if getattr(args, name) is not None
    }
    if not changes:
        raise BadInput("nothing to change (see mssd annuaire set --help)")
    # Our mailboxes are stored with A-label domains (migration 0007).
    address = mailbox_key(args.address)
    try:
        stored = await set_mailbox_settings(engine, address, actor=actor, **changes)
    except SettingError as error:
        raise BadInput(f"{error}; nothing was changed") from None
    print(
        f"directory settings of {address} changed: "
        + ", ".join(f"{k}={'' if v is None else v}" for k, v in stored.items())
    )
