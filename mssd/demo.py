"""The demo set-up of the quick start: a domain, one PER, one ORG with a
delegate, one APP mailbox, their certificates, and how to connect.

Identities are fictitious. The password is generated on first run and kept in
``var/demo-credentials.txt`` (mode 0600); nothing secret is in the repository.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from pathlib import Path

from mssd.auth.passwords import hash_password
from mssd.config import Settings
from mssd.store import admin
from mssd.store.engine import create_engine, upgrade
from mssd.store.errors import Conflict
from mssd.trust import pki
from mssd.trust.identity import normalise_dn

DEMO_DOMAIN = "demo.mssd.test"
PER_ADDRESS = f"claire.martin@{DEMO_DOMAIN}"
PER_IDNAT = "810001234567"
ORG_ADDRESS = f"secretariat.cardiologie@{DEMO_DOMAIN}"
APP_ADDRESS = f"laboratoire@{DEMO_DOMAIN}"
STRUCTURE = "1750000000"


def _demo_password(var_dir: Path) -> str:
    path = var_dir / "demo-credentials.txt"
    if path.exists():
        return path.read_text(encoding="utf-8").split()[1]
    password = secrets.token_urlsafe(12)
    var_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(f"{PER_ADDRESS} {password}\n")
    return password


async def setup_demo(settings: Settings) -> None:
    hostnames = [settings.server.hostname]
    if "localhost" not in hostnames:
        hostnames.append("localhost")
    dev = pki.init_dev_pki(
        settings.pki.directory,
        hostnames=hostnames,
        operator_structure=settings.pki.operator_structure,
    )
    issued = dev.directory / "issued"
    if not (issued / "claire-martin.pem").exists():
        pki.issue_personal_certificate(
            dev,
            idnat_ps=PER_IDNAT,
            surname="MARTIN",
            given_name="Claire",
            profession="Médecin",
            name="claire-martin",
        )
    if not (issued / "laboratoire.pem").exists():
        app_cert = pki.issue_app_certificate(
            dev,
            common_name="laboratoire.demo.mssd.test",
            idnat_struct=STRUCTURE,
            organisation="Laboratoire de démonstration",
            name="laboratoire",
        )
        app_dn = app_cert.subject_dn
    else:
        from cryptography import x509

        cert = x509.load_pem_x509_certificate((issued / "laboratoire.pem").read_bytes())
        app_dn = cert.subject.rfc4514_string()
    password = _demo_password(settings.server.var_dir)
    engine = create_engine(settings.store.url)
    try:
        await upgrade(engine)
        actor = "demo"
        try:
            await admin.add_domain(engine, DEMO_DOMAIN, actor=actor)
        except Conflict:
            pass
        hashed = await asyncio.to_thread(hash_password, password, settings.auth)
        creations = [
            dict(
                address=PER_ADDRESS,
                bal_type="PER",
                owner_idnat=PER_IDNAT,
                idnat_ps=PER_IDNAT,
                display_name="Dr Claire MARTIN",
                password_hash=hashed,
            ),
            dict(
                address=ORG_ADDRESS,
                bal_type="ORG",
                owner_idnat=STRUCTURE,
                display_name="Secrétariat de cardiologie",
            ),
            dict(
                address=APP_ADDRESS,
                bal_type="APP",
                owner_idnat=STRUCTURE,
                cert_dn=normalise_dn(app_dn),
                display_name="Laboratoire (logiciel)",
            ),
        ]
        for values in creations:
            try:
                await admin.create_mailbox(engine, actor=actor, **values)  # type: ignore[arg-type]
            except Conflict:
                pass
        await admin.grant(
            engine,
            ORG_ADDRESS,
            PER_ADDRESS,
            rights=admin.DEFAULT_DELEGATE_RIGHTS,
            may_send=True,
            actor=actor,
        )
    finally:
        await engine.dispose()
    print(f"demo domain {DEMO_DOMAIN}:")
    print(f"  PER {PER_ADDRESS}  login {PER_ADDRESS}  password {password}")
    print(f"      CPS-style certificate {issued / 'claire-martin.pem'} (key beside it)")
    print(f"  ORG {ORG_ADDRESS}  delegated to {PER_ADDRESS} (may read and send as it)")
    print(f"  APP {APP_ADDRESS}  certificate {issued / 'laboratoire.pem'} (SASL EXTERNAL)")
    print(f"  CA bundle to trust: {dev.ca_bundle}")
