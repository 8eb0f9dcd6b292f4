"""The ``mssd`` command: serve, db, domain, mailbox, account, pki, whitelist, audit, demo,
annuaire (queue and dkim live in ``cli_queue.py``).

Each sub-command validates its input, calls the store or the trust package,
and prints a one-line result. Errors are printed as ``mssd: <what went wrong>``
with exit status 2 for bad input and 1 for refused changes; no traceback for
anything an administrator can fix.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from cryptography.x509.oid import NameOID
from email_validator import EmailNotValidError, validate_email

from mssd import __version__
from mssd.auth.passwords import hash_password
from mssd.auth.totp import generate_totp_secret, provisioning_uri
from mssd.config import ConfigError, Settings, load
from mssd.store import admin, quota
from mssd.store.audit import AuditLog, read_audit
from mssd.store.engine import SchemaError, create_engine, current_revision, head_revision, upgrade
from mssd.store.errors import StoreError
from mssd.store.messages import folder_states, list_messages, read_blob
from mssd.store.records import BAL_TYPES, AuditEvent
from mssd.trust.identity import DnError, normalise_dn, parse_dn
from mssd.trust.idnat import IdNatError, check_idnat_ps, check_idnat_struct
from mssd.trust.pki import PkiError
from mssd.trust.tls import TlsConfigError
from mssd.trust.whitelist import display_domain, mailbox_key

_OU = NameOID.ORGANIZATIONAL_UNIT_NAME


class UsageError(Exception):
    """Bad input on the command line (exit status 2)."""


def fail(message: str, status: int = 1) -> NoReturn:
    print(f"mssd: {message}", file=sys.stderr)
    raise SystemExit(status)


def actor() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"cli:{user}"


def check_address(address: str) -> str:
    """The address as the store keeps it: local part in lower case, the domain as
    an A-label (an IDN domain is one domain whichever way it is written)."""
    try:
        # No DNS look-up here; test_environment admits the RFC 6761 ".test"
        # domains that development and test deployments use.
        valid = validate_email(address, check_deliverability=False, test_environment=True)
    except EmailNotValidError as error:
        raise UsageError(f"{address!r} is not a valid mail address: {error}") from None
    return mailbox_key(valid.normalized)


def size_argument(text: str | None) -> int | None:
    try:
        return None if text is None else quota.parse_size(text)
    except ValueError as error:
        raise UsageError(str(error)) from None


def check_domain(name: str) -> str:
    return check_address(f"postmaster@{name}").rpartition("@")[2]


def shown_domain(a_label: str) -> str:
    """A domain for people: its U-labels, with the A-label when they differ."""
    shown = display_domain(a_label)
    return a_label if shown == a_label else f"{shown} ({a_label})"


def read_password(args: argparse.Namespace, *, required: bool) -> str | None:
    if getattr(args, "password_file", None):
        text = Path(args.password_file).read_text(encoding="utf-8").rstrip("\r\n")
    elif getattr(args, "password_stdin", False):
        text = sys.stdin.readline().rstrip("\r\n")
    elif sys.stdin.isatty() and required:
        text = getpass.getpass("New password: ")
        if getpass.getpass("Again: ") != text:
            raise UsageError("the two passwords differ")
    elif required:
        raise UsageError("give the password with --password-stdin or --password-file")
    else:
        return None
    if len(text) < 12:
        raise UsageError("a password needs at least 12 characters")
    return text


async def with_engine(settings: Settings, work: Callable[[Any], Awaitable[None]]) -> None:
    engine = create_engine(settings.store.url)
    try:
        await work(engine)
    finally:
        await engine.dispose()


# -- commands ---------------------------------------------------------------------


async def cmd_serve(settings: Settings, args: argparse.Namespace) -> None:
    from mssd.app import serve, serve_imap_worker

    if args.imap_worker:
        await serve_imap_worker(settings, args.imap_worker, args.parent_fd, args.changes_fd)
        return

    def announce(line: str) -> None:
        print(line, flush=True)

    # The other IMAP processes (imap.workers) run this command with this configuration.
    command = [sys.executable, "-m", "mssd"]
    command += ["--config", args.config] if args.config else []
    command += ["--verbose"] if args.verbose else []
    await serve(settings, announce=announce, worker_command=command)


async def cmd_db(settings: Settings, args: argparse.Namespace) -> None:
    async def work(engine: Any) -> None:
        if args.db_command == "upgrade":
            before, after = await upgrade(engine)
            print(f"schema {before or 'empty'} -> {after}")
        else:
            current = await current_revision(engine)
            head = head_revision()
            state = "up to date" if current == head else "needs `mssd db upgrade`"
            print(f"schema {current or 'empty'} (this mssd: {head}): {state}")

    await with_engine(settings, work)


async def cmd_domain(settings: Settings, args: argparse.Namespace) -> None:
    async def work(engine: Any) -> None:
        if args.domain_command == "add":
            name = check_domain(args.name)
            await admin.add_domain(engine, name, actor=actor())
            print(f"domain {shown_domain(name)} added")
        else:
            for name in await admin.list_domains(engine):
                print(name)

    await with_engine(settings, work)


def mailbox_owner(args: argparse.Namespace) -> tuple[str, str | None, str | None]:
    """(owner idNat, idnat_ps of the owning professional, normalised cert DN)."""
    cert_dn: str | None = None
    structure_from_dn: str | None = None
    if args.cert_dn:
        try:
            name = parse_dn(args.cert_dn)
        except DnError as error:
            raise UsageError(f"--cert-dn: {error}") from None
        cert_dn = normalise_dn(name)
        for attribute in name.get_attributes_for_oid(_OU):
            value = str(attribute.value)
            try:
                structure_from_dn = check_idnat_struct(value)
            except IdNatError:
                continue
    try:
        if args.type == "PER":
            if not args.idnat:
                raise UsageError("a PER mailbox needs --idnat (the professional's idNat_PS)")
            if args.structure:
                raise UsageError("--structure is for ORG, APP and CAB mailboxes")
            return check_idnat_ps(args.idnat), args.idnat, cert_dn
        if args.idnat:
            raise UsageError(f"--idnat is for PER mailboxes; a {args.type} mailbox has --structure")
        structure = args.structure or structure_from_dn
        if args.type == "APP" and not args.cert_dn:
            raise UsageError(
                'an APP mailbox needs --cert-dn "..." (the DN of the software\'s certificate)'
            )
        if not structure:
            raise UsageError(
                f"a {args.type} mailbox needs --structure (idNat_Struct)"
                + (" or a certificate DN whose OU is one" if args.type == "APP" else "")
            )
        return check_idnat_struct(structure), None, cert_dn
    except IdNatError as error:
        raise UsageError(str(error)) from None


async def cmd_mailbox(settings: Settings, args: argparse.Namespace) -> None:
    command = args.mailbox_command

    async def work(engine: Any) -> None:
        if command == "create":
            address = check_address(args.address)
            owner, idnat_ps, cert_dn = mailbox_owner(args)
            password = read_password(args, required=False)
            password_hash = (
                await asyncio.to_thread(hash_password, password, settings.auth)
                if password
                else None
            )
            await admin.create_mailbox(
                engine,
                address=address,
                bal_type=args.type,
                owner_idnat=owner,
                idnat_ps=idnat_ps,
                cert_dn=cert_dn,
                display_name=args.name,
                password_hash=password_hash,
                quota_bytes=size_argument(args.quota),
                actor=actor(),
            )
            print(f"{args.type} mailbox {address} created (owner {owner})")
        elif command == "grant":
            rights = args.rights
            if not rights or set(rights) - set(admin.ACL_RIGHTS):
                raise UsageError(
                    f"--rights: use RFC 4314 letters from {admin.ACL_RIGHTS!r}, got {rights!r}"
                )
            await admin.grant(
                engine,
                check_address(args.address),
                args.account,
                rights=rights,
                may_send=not args.no_send,
                actor=actor(),
            )
            print(
                f"{args.account} may use {args.address} with rights {rights}"
                + ("" if args.no_send else " and send as it")
            )
        elif command == "revoke":
            await admin.revoke(engine, mailbox_key(args.address), args.account, actor=actor())
            print(f"{args.account} no longer uses {args.address}")
        elif command in ("suspend", "close", "reactivate"):
            status = {"suspend": "suspended", "close": "closed", "reactivate": "active"}[command]
            await admin.set_mailbox_status(
                engine,
                mailbox_key(args.address),
                status,  # type: ignore[arg-type]
                actor=actor(),
            )
            print(f"mailbox {args.address} is now {status}")
        elif command == "list":
            domain = check_domain(args.domain) if args.domain else None
            for info in await admin.list_mailboxes(engine, domain=domain):
                delegates = "; ".join(
                    f"{login}:{rights}{'+send' if send else ''}"
                    for login, rights, send in info.delegates
                )
                print(
                    f"{info.address}\t{info.bal_type}\t{info.status}\towner={info.owner_idnat}"
                    f"\tlogin={info.account_login}\tmessages={info.message_count}"
                    + (f"\tdelegates={delegates}" if delegates else "")
                )
        elif command == "quota":
            await admin.set_quota(engine, args.address, size_argument(args.size), actor=actor())
            usage = await admin.mailbox_quota(engine, args.address)
            print(f"mailbox {usage.root}: {usage.describe()}")
        elif command == "show":
            await show_mailbox(engine, mailbox_key(args.address), args.folder)

    await with_engine(settings, work)


async def show_mailbox(engine: Any, address: str, folder: str | None) -> None:
    from mssd.mime.headers import header_block

    messages = await list_messages(engine, address, folder=folder)
    # DESIGN.md, Storage: every access to a mailbox is audited, an administrator's too.
    await AuditLog(engine).record(
        AuditEvent(
            actor=actor(),
            action="mailbox.show",
            target=address.lower(),
            details={"folder": folder} if folder else {},
        )
    )
    print(f"quota: {(await admin.mailbox_quota(engine, address)).describe()}")
    for state in await folder_states(engine, address):
        if folder is None or state.name == folder:
            print(
                f"folder {state.name}: uidvalidity={state.uidvalidity} uidnext={state.uidnext} "
                f"highestmodseq={state.highestmodseq}"
                + (f" special-use={state.special_use}" if state.special_use else "")
            )
    for message in messages:
        headers = header_block((await read_blob(engine, message.sha256))[:65536])
        fields = _summary_fields(headers)
        print(
            f"{message.folder}\tuid={message.uid}\t{message.internal_date.isoformat()}"
            f"\t{message.size} octets\tsha256={message.sha256[:16]}"
            f"\tflags={message.flags or '-'}\tfrom={fields.get('from', '')}"
            f"\tsubject={fields.get('subject', '')}"
        )
    print(f"{len(messages)} message(s)")


def _summary_fields(headers: bytes) -> dict[str, str]:
    import email.header
    import email.parser
    import email.policy

    parsed = email.parser.BytesHeaderParser(policy=email.policy.default).parsebytes(headers)
    result: dict[str, str] = {}
    for name in ("from", "subject"):
        value = parsed.get(name)
        if value is not None:
            result[name] = " ".join(str(value).split())[:120]
    return result


async def cmd_account(settings: Settings, args: argparse.Namespace) -> None:
    async def work(engine: Any) -> None:
        if args.account_command == "passwd":
            password = read_password(args, required=True)
            assert password is not None
            hashed = await asyncio.to_thread(hash_password, password, settings.auth)
            await admin.set_password(engine, args.login, hashed, actor=actor())
            print(f"password of {args.login} changed")
        elif args.account_command == "totp":
            if args.disable:
                await admin.set_totp(engine, args.login, None, actor=actor())
                print(f"one-time codes disabled for {args.login}")
                return
            secret = generate_totp_secret()
            await admin.set_totp(engine, args.login, secret, actor=actor())
            print(f"one-time codes enabled for {args.login}")
            print(f"secret: {secret}")
            print(f"uri: {provisioning_uri(secret, args.login)}")
            print("log in with the password immediately followed by the current 6-digit code")

    await with_engine(settings, work)


async def cmd_audit(settings: Settings, args: argparse.Namespace) -> None:
    async def work(engine: Any) -> None:
        for event in await read_audit(engine, action_prefix=args.action or "", limit=args.limit):
            assert event.at is not None
            print(
                f"{event.at.isoformat()}\t{event.action}\t{event.result}\tactor={event.actor}"
                f"\ttarget={event.target}\tremote={event.remote}\t{event.details}"
            )

    await with_engine(settings, work)


async def cmd_pki(settings: Settings, args: argparse.Namespace) -> None:
    from mssd.trust import pki

    directory = Path(args.dir) if args.dir else settings.pki.directory
    if args.pki_command == "init":
        hostnames = args.hostname or [settings.server.hostname]
        if "localhost" not in hostnames:
            hostnames.append("localhost")
        result = pki.init_dev_pki(
            directory,
            hostnames=hostnames,
            operator_structure=settings.pki.operator_structure,
            force=args.force,
        )
        print(f"development PKI in {result.directory} (server certificate {result.server_cert})")
        return
    dev = pki.init_dev_pki(directory)
    if args.pki_command == "issue-personal":
        issued = pki.issue_personal_certificate(
            dev,
            idnat_ps=args.idnat,
            surname=args.surname,
            given_name=args.given_name,
            profession=args.profession,
            name=args.name,
        )
    elif args.pki_command == "issue-app":
        issued = pki.issue_app_certificate(
            dev,
            common_name=args.cn,
            idnat_struct=args.structure,
            organisation=args.organisation,
            name=args.name,
        )
    elif args.pki_command == "issue-server":
        issued = pki.issue_server_certificate(
            dev,
            common_name=args.cn,
            idnat_struct=args.structure,
            organisation=args.organisation,
            name=args.name,
        )
    else:
        pki.revoke(dev, Path(args.cert))
        print(f"{args.cert} revoked; CRL {dev.crl} updated")
        return
    print(f"certificate {issued.cert} key {issued.key}")
    print(f"subject: {issued.subject_dn}")


async def cmd_whitelist(settings: Settings, args: argparse.Namespace) -> None:
    from mssd.config import whitelist_cache_file
    from mssd.delivery.whitelist import WhitelistKeeper
    from mssd.store.whitelist import latest_whitelist, refusals
    from mssd.trust.whitelist import normalise_domain, parse_whitelist

    async def work(engine: Any) -> None:
        if args.whitelist_command == "refresh":
            if args.max_shrink is not None and not 0.0 <= args.max_shrink <= 1.0:
                raise UsageError(f"--max-shrink: a fraction between 0 and 1, got {args.max_shrink}")
            keeper = WhitelistKeeper(
                engine, settings.whitelist, whitelist_cache_file(settings), actor=actor()
            )
            await keeper.load()
            outcome = await keeper.refresh(
                source=args.source, checksum_source=args.checksum_source, max_shrink=args.max_shrink
            )
            if outcome.status in ("refused", "failed"):
                fail(f"whitelist {outcome.message}", 1)
            print(outcome.message)
            return
        stored = await latest_whitelist(engine)
        if stored is None:
            fail(
                "no whitelist in force: run `mssd whitelist refresh` "
                f"(whitelist.source is {settings.whitelist.source or 'not set'})",
                1,
            )
        listed = await asyncio.to_thread(parse_whitelist, stored.content)
        if args.whitelist_command == "show":
            print(
                f"whitelist in force: {len(listed.domains)} domains, "
                f"{len(listed.operators)} operator certificates, {listed.entry_count} entries"
            )
            print(f"source: {stored.source}")
            print(f"sha256: {stored.sha256}")
            print(f"published: {stored.generated_at or 'unknown'}")
            print(f"loaded: {stored.loaded_at.isoformat()}")
            if listed.skipped:
                print(f"unusable entries skipped: {len(listed.skipped)}")
                for line in listed.skipped[:10]:
                    print(f"  {line}")
            total, recent = await refusals(engine, limit=3)
            print(f"refused updates: {total}")
            for refusal in recent:
                print(f"  {refusal.at.isoformat()} {refusal.kind} from {refusal.source}: "
                      f"{refusal.message}")  # fmt: skip
            return
        try:
            domain = normalise_domain(args.domain)
        except ValueError as error:
            raise UsageError(str(error)) from None
        shown = shown_domain(domain)
        operators = listed.operators_for(domain)
        if not operators:
            fail(f"{shown} is not in the MSSanté whitelist", 1)
        if args.dn:
            try:
                wanted = normalise_dn(args.dn)
            except DnError as error:
                raise UsageError(f"--dn: {error}") from None
            if wanted not in operators:
                fail(
                    f"{wanted} is not listed for {shown}; listed: " + "; ".join(sorted(operators)),
                    1,
                )
            print(f"{wanted} may exchange mail for {shown}")
            return
        print(f"{shown} is in the MSSanté whitelist; operator certificates:")
        for dn in sorted(operators):
            print(f"  {dn}")

    await with_engine(settings, work)


async def cmd_annuaire(settings: Settings, args: argparse.Namespace) -> None:
    from mssd.annuaire import commands

    try:
        await commands.run(settings, args, actor())
    except commands.BadInput as error:
        raise UsageError(str(error)) from None
    except commands.Failed as error:
        fail(str(error), 1)


async def cmd_demo(settings: Settings, args: argparse.Namespace) -> None:
    from mssd.demo import setup_demo

    await setup_demo(settings)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="mssd", description="An MSSanté operator.")
    top.add_argument("--version", action="version", version=f"mssd {__version__}")
    top.add_argument("--config", help="TOML configuration file (default: $MSSD_CONFIG)")
    top.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    sub = top.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the SMTP and IMAP listeners")
    serve.set_defaults(run=cmd_serve)
    # Internal: how `serve` starts its other IMAP processes (mssd.workers).
    serve.add_argument("--imap-worker", help=argparse.SUPPRESS)
    serve.add_argument("--parent-fd", type=int, help=argparse.SUPPRESS)
    serve.add_argument("--changes-fd", type=int, help=argparse.SUPPRESS)

    db = sub.add_parser("db", help="database schema")
    db.add_argument("db_command", choices=("upgrade", "status"))
    db.set_defaults(run=cmd_db)

    domain = sub.add_parser("domain", help="hosted mail domains")
    dsub = domain.add_subparsers(dest="domain_command", required=True)
    dsub.add_parser("add").add_argument("name")
    dsub.add_parser("list")
    domain.set_defaults(run=cmd_domain)

    mailbox = sub.add_parser("mailbox", help="mailboxes (BAL)")
    msub = mailbox.add_subparsers(dest="mailbox_command", required=True)
    create = msub.add_parser("create", help="create a PER, ORG, APP or CAB mailbox")
    create.add_argument("--type", required=True, choices=BAL_TYPES, type=str.upper)
    create.add_argument("--address", required=True)
    create.add_argument("--idnat", help="idNat_PS of the professional (PER)")
    create.add_argument("--structure", help="idNat_Struct of the organisation (ORG, APP, CAB)")
    create.add_argument("--cert-dn", help="DN of the certificate that may log in as this mailbox")
    create.add_argument("--name", help="display name")
    create.add_argument("--password-stdin", action="store_true")
    create.add_argument("--password-file")
    create.add_argument("--quota", help="storage quota: octets, or 500M, 2G...; default none")
    set_quota = msub.add_parser("quota", help="change a mailbox's storage quota")
    set_quota.add_argument("address")
    set_quota.add_argument("size", help="octets, or 500M, 2G...; none for no limit")
    grant = msub.add_parser("grant", help="delegate an ORG/CAB mailbox to an account")
    grant.add_argument("address")
    grant.add_argument("account", help="login of the delegated account")
    grant.add_argument("--rights", default=admin.DEFAULT_DELEGATE_RIGHTS, help="RFC 4314 rights")
    grant.add_argument("--no-send", action="store_true", help="may read but not send as it")
    revoke = msub.add_parser("revoke", help="remove a delegation")
    revoke.add_argument("address")
    revoke.add_argument("account")
    for name in ("suspend", "close", "reactivate"):
        msub.add_parser(name).add_argument("address")
    msub.add_parser("list").add_argument("--domain")
    show = msub.add_parser("show", help="folders and messages of a mailbox")
    show.add_argument("address")
    show.add_argument("--folder")
    mailbox.set_defaults(run=cmd_mailbox)

    account = sub.add_parser("account", help="login accounts")
    asub = account.add_subparsers(dest="account_command", required=True)
    passwd = asub.add_parser("passwd", help="set an account's password")
    passwd.add_argument("login")
    passwd.add_argument("--password-stdin", action="store_true")
    passwd.add_argument("--password-file")
    totp = asub.add_parser("totp", help="require a one-time code (RFC 6238) after the password")
    totp.add_argument("login")
    totp.add_argument("--disable", action="store_true")
    account.set_defaults(run=cmd_account)

    pki_parser = sub.add_parser("pki", help="development PKI shaped like IGC-Santé")
    psub = pki_parser.add_subparsers(dest="pki_command", required=True)
    init = psub.add_parser("init")
    init.add_argument("--hostname", action="append")
    init.add_argument("--force", action="store_true")
    personal = psub.add_parser("issue-personal", help="a CPS-style personal certificate")
    for option in ("--idnat", "--surname", "--given-name", "--profession", "--name"):
        personal.add_argument(option, required=True)
    app_cert = psub.add_parser("issue-app", help="an organisation certificate for software")
    for option in ("--cn", "--structure", "--organisation", "--name"):
        app_cert.add_argument(option, required=True)
    server_cert = psub.add_parser(
        "issue-server", help="an operator server certificate (another operator, for tests)"
    )
    for option in ("--cn", "--structure", "--organisation", "--name"):
        server_cert.add_argument(option, required=True)
    revoke_cert = psub.add_parser("revoke")
    revoke_cert.add_argument("cert")
    for p in (init, personal, app_cert, server_cert, revoke_cert):
        p.add_argument("--dir", help="PKI directory (default: pki.directory)")
    pki_parser.set_defaults(run=cmd_pki)

    whitelist = sub.add_parser("whitelist", help="the ANS whitelist of the MSSanté trust space")
    wsub = whitelist.add_subparsers(dest="whitelist_command", required=True)
    wsub.add_parser("show", help="the list in force and the refused updates")
    check = wsub.add_parser("check", help="whether a domain (and a certificate DN) is listed")
    check.add_argument("domain")
    check.add_argument("--dn", help="a certificate DN that should be listed for the domain")
    refresh = wsub.add_parser("refresh", help="fetch the list now and replace it if accepted")
    refresh.add_argument("--source", help="file or https:// URL (default: whitelist.source)")
    refresh.add_argument("--checksum-source", help="default: whitelist.checksum_source")
    refresh.add_argument(
        "--max-shrink",
        type=float,
        help="fraction the list may shrink (default: whitelist.max_shrink)",
    )
    whitelist.set_defaults(run=cmd_whitelist)

    audit_parser = sub.add_parser("audit", help="read the audit trail, newest first")
    audit_parser.add_argument("--action", help="only actions starting with this")
    audit_parser.add_argument("--limit", type=int, default=50)
    audit_parser.set_defaults(run=cmd_audit)

    sub.add_parser("demo", help="create the demo domain and mailboxes").set_defaults(run=cmd_demo)

    from mssd.annuaire.commands import add_parser as add_annuaire_parser
    from mssd.cli_queue import add_parsers

    add_annuaire_parser(sub).set_defaults(run=cmd_annuaire)
    add_parsers(sub)
    return top


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        for name in ("mail.log", "alembic", "httpx"):
            logging.getLogger(name).setLevel(logging.WARNING)
    try:
        settings = load(Path(args.config) if args.config else None)
        loop_factory = None
        if args.command == "serve":
            from mssd.app import event_loop_factory

            loop_factory = event_loop_factory(settings)
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(args.run(settings, args))
    except ConfigError as error:
        fail(f"configuration: {error}", 2)
    except UsageError as error:
        fail(str(error), 2)
    except (StoreError, SchemaError) as error:
        fail(str(error), 1)
    except TlsConfigError as error:
        fail(f"TLS: {error} (`mssd pki init` creates a development PKI)", 1)
    except PkiError as error:
        fail(f"PKI: {error}", 1)
    except OSError as error:
        fail(str(error), 1)
    except KeyboardInterrupt:
        fail("interrupted", 130)
