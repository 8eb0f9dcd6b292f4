"""A stand-in for the Annuaire Santé FHIR API v2, over HTTPS on loopback.

A test double of a national service the tests cannot reach: it serves the
synthetic population (tests/annuaire_population.py) as Practitioner,
PractitionerRole and Organization resources whose ``telecom`` carry MSSanté
mailboxes with the FR Core email-type extension and the Annuaire Santé
``as-ext-mailbox-mss-metadata`` extension, answers searches with paged
``searchset`` Bundles (``next`` links), and applies conditional FHIR PATCH
(``Parameters`` with insert / replace / delete on ``telecom``): 404 when the
condition matches nothing, 412 when it matches several.

Faults on demand, by the value of ``mailbox-mss``: ``busy...`` answers 429 once
then succeeds, ``broken...`` always 503, ``stall...`` sleeps ``stall_seconds``.
"""

from __future__ import annotations

import copy
import json
import re
import ssl
import threading
import time
import unicodedata
import urllib.parse
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from annuaire_population import Person

METADATA = "https://interop.esante.gouv.fr/ig/fhir/annuaire/StructureDefinition/as-ext-mailbox-mss-metadata"
EMAIL_TYPE = "https://hl7.fr/ig/fhir/core/StructureDefinition/fr-core-contact-point-email-type"
EMAIL_TYPE_SYSTEM = (
    "https://mos.esante.gouv.fr/NOS/TRE_R256-TypeMessagerie/FHIR/TRE-R256-TypeMessagerie"
)
BAL_TYPE_SYSTEM = "https://mos.esante.gouv.fr/NOS/TRE_R257-TypeBAL/FHIR/TRE-R257-TypeBAL"
IDNAT_PS = "urn:oid:1.2.250.1.71.4.2.1"
IDNAT_STRUCT = "urn:oid:1.2.250.1.71.4.2.2"
FINESS = "https://finess.esante.gouv.fr"
G15 = "https://mos.esante.gouv.fr/NOS/TRE_G15-ProfessionSante/FHIR/TRE-G15-ProfessionSante"
R38 = "https://mos.esante.gouv.fr/NOS/TRE_R38-SpecialiteOrdinale/FHIR/TRE-R38-SpecialiteOrdinale"
R66 = "https://mos.esante.gouv.fr/NOS/TRE_R66-CategorieEtablissement/FHIR/TRE-R66-CategorieEtablissement"
PAGE_SIZE = 5
SEARCH_PARAMS = {
    "Practitioner": {"mailbox-mss", "identifier", "family", "given"},
    "PractitionerRole": {"mailbox-mss", "practitioner.identifier"},
    "Organization": {"mailbox-mss", "identifier", "address-city", "address-postalcode"},
}


def fold(text: str) -> str:
    if text.isascii():
        return " ".join(text.casefold().split())
    bare = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    return " ".join(bare.casefold().split())


def contact_point(p: Person) -> dict[str, Any]:
    metadata: list[dict[str, Any]] = [
        {
            "url": "type",
            "valueCodeableConcept": {"coding": [{"system": BAL_TYPE_SYSTEM, "code": p.bal_type}]},
        },
        {"url": "listeRouge", "valueBoolean": p.liste_rouge},
        {"url": "digitization", "valueBoolean": p.dematerialisation},
    ]
    for url, value in (
        ("description", p.description),
        ("responsible", p.responsible),
        ("service", p.service),
        ("phone", p.phone),
    ):
        if value:
            metadata.append({"url": url, "valueString": value})
    return {
        "system": "email",
        "value": p.address,
        "extension": [
            {"url": EMAIL_TYPE, "valueCoding": {"system": EMAIL_TYPE_SYSTEM, "code": "MSSANTE"}},
            {"url": METADATA, "extension": metadata},
        ],
    }


def resources(people: list[Person]) -> list[dict[str, Any]]:
    practitioners: dict[str, dict[str, Any]] = {}
    organizations: dict[str, dict[str, Any]] = {}
    roles: list[dict[str, Any]] = []
    for p in people:
        if p.bal_type in ("PER", "CAB"):
            if p.address.startswith("double.cabinet@"):
                roles.append(
                    {
                        "resourceType": "PractitionerRole",
                        "id": f"role-{len(roles)}",
                        "practitioner": {
                            "identifier": {"system": IDNAT_PS, "value": p.idnat_ps},
                            "display": f"{p.first_name} {p.last_name}",
                        },
                        "code": [
                            {
                                "coding": [
                                    {
                                        "system": G15,
                                        "code": p.profession_code,
                                        "display": p.profession_label,
                                    }
                                ]
                            }
                        ],
                        "telecom": [contact_point(p)],
                    }
                )
                continue
            resource = practitioners.get(p.idnat_ps)
            if resource is None:
                qualification = [
                    {
                        "code": {
                            "coding": [
                                {
                                    "system": G15,
                                    "code": p.profession_code,
                                    "display": p.profession_label,
                                }
                            ]
                        }
                    }
                ]
                if p.savoir_faire:
                    qualification.append(
                        {
                            "code": {
                                "coding": [{"system": R38, "code": "SM", "display": p.savoir_faire}]
                            }
                        }
                    )
                resource = practitioners[p.idnat_ps] = {
                    "resourceType": "Practitioner",
                    "id": f"pra-{p.idnat_ps}",
                    "identifier": [{"use": "official", "system": IDNAT_PS, "value": p.idnat_ps}],
                    "name": [
                        {
                            "family": p.last_name,
                            "given": [p.first_name],
                            **({"prefix": [p.civility]} if p.civility else {}),
                        }
                    ],
                    "qualification": qualification,
                    "telecom": [],
                }
            resource["telecom"].append(contact_point(p))
        else:
            resource = organizations.get(p.structure_id)
            if resource is None:
                resource = organizations[p.structure_id] = {
                    "resourceType": "Organization",
                    "id": f"org-{p.structure_id}",
                    "identifier": [
                        {"system": IDNAT_STRUCT, "value": p.structure_id},
                        {"system": FINESS, "value": p.finess},
                    ],
                    "type": [{"coding": [{"system": R66, "code": p.structure_category}]}],
                    "name": p.structure_name,
                    "address": [{"line": [p.street], "postalCode": p.postcode, "city": p.city}],
                    "telecom": [],
                }
            resource["telecom"].append(contact_point(p))
    return [*practitioners.values(), *roles, *organizations.values()]


def outcome(code: str, diagnostics: str) -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": diagnostics}],
    }


_WHERE = re.compile(r"^(\w+)\.telecom\.where\(value\s*=\s*'([^']*)'\)$")


class FhirServer:
    """The API on https://localhost:PORT/fhir/v2 (``url``)."""

    def __init__(
        self,
        people: list[Person],
        cert: Path,
        key: Path,
        *,
        api_key: str = "test-api-key",
        stall_seconds: float = 5.0,
    ) -> None:
        self.resources = resources(people)
        self.api_key = api_key
        self.stall_seconds = stall_seconds
        self.lock = threading.Lock()
        self.requests: list[tuple[str, str, Any]] = []
        self.attempts: dict[str, int] = defaultdict(int)
        self.page_size = PAGE_SIZE
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                return None

            def do_GET(self) -> None:
                server.handle(self, "GET")

            def do_PATCH(self) -> None:
                server.handle(self, "PATCH")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(str(cert), str(key))
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = int(self.httpd.server_address[1])
        self.url = f"https://localhost:{self.port}/fhir/v2"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()

    # -- HTTP ----------------------------------------------------------------------

    def reply(
        self, handler: BaseHTTPRequestHandler, status: int, body: Any, **headers: str
    ) -> None:
        data = json.dumps(body).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/fhir+json")
        handler.send_header("Content-Length", str(len(data)))
        for name, value in headers.items():
            handler.send_header(name.replace("_", "-"), value)
        handler.end_headers()
        handler.wfile.write(data)

    def handle(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        split = urllib.parse.urlsplit(handler.path)
        params = urllib.parse.parse_qs(split.query, keep_blank_values=True)
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length else b""
        body = json.loads(raw) if raw else None
        with self.lock:
            self.requests.append((method, handler.path, body))
        if self.api_key and handler.headers.get("ESANTE-API-KEY") != self.api_key:
            self.reply(handler, 401, outcome("login", "missing or wrong ESANTE-API-KEY"))
            return
        prefix = "/fhir/v2/"
        if not split.path.startswith(prefix) or split.path[len(prefix) :] not in SEARCH_PARAMS:
            self.reply(handler, 404, outcome("not-found", f"no endpoint {split.path}"))
            return
        kind = split.path[len(prefix) :]
        single = {k: v[0] for k, v in params.items()}
        if method == "GET":
            self.search(handler, kind, single)
        else:
            if handler.headers.get("Content-Type", "").split(";")[0] != "application/fhir+json":
                self.reply(handler, 415, outcome("not-supported", "expected application/fhir+json"))
                return
            self.patch(handler, kind, single, body)

    def search(self, handler: BaseHTTPRequestHandler, kind: str, params: dict[str, str]) -> None:
        mailbox = params.get("mailbox-mss", "")
        if mailbox.startswith("stall"):
            time.sleep(self.stall_seconds)
        if mailbox.startswith("broken"):
            self.reply(handler, 503, outcome("transient", "service unavailable"))
            return
        if mailbox.startswith("busy"):
            with self.lock:
                self.attempts[f"{kind}:{mailbox}"] += 1
                first = self.attempts[f"{kind}:{mailbox}"] == 1
            if first:
                self.reply(handler, 429, outcome("throttled", "slow down"), Retry_After="0")
                return
        criteria = {k: v for k, v in params.items() if not k.startswith("_")}
        unknown = set(criteria) - SEARCH_PARAMS[kind]
        if unknown:
            self.reply(handler, 400, outcome("not-supported", f"unknown parameter {unknown}"))
            return
        with self.lock:
            matches = [
                r for r in self.resources if r["resourceType"] == kind and _matches(r, criteria)
            ]
        count = int(params.get("_count") or self.page_size)
        count = min(count, self.page_size)
        offset = int(params.get("_getpagesoffset") or 0)
        page = matches[offset : offset + count]
        base = f"{self.url}/{kind}"
        links = [{"relation": "self", "url": f"{base}?{urllib.parse.urlencode(params)}"}]
        if offset + count < len(matches):
            following = {**params, "_getpagesoffset": str(offset + count), "_count": str(count)}
            links.append({"relation": "next", "url": f"{base}?{urllib.parse.urlencode(following)}"})
        self.reply(
            handler,
            200,
            {
                "resourceType": "Bundle",
                "type": "searchset",
                "total": len(matches),
                "link": links,
                "entry": [
                    {
                        "fullUrl": f"{base}/{r['id']}",
                        "resource": r,
                        "search": {"mode": "match"},
                    }
                    for r in page
                ],
            },
        )

    def patch(
        self, handler: BaseHTTPRequestHandler, kind: str, params: dict[str, str], body: Any
    ) -> None:
        if set(params) != {"identifier"}:
            self.reply(handler, 400, outcome("invalid", "conditional PATCH needs identifier="))
            return
        with self.lock:
            matches = [
                r for r in self.resources if r["resourceType"] == kind and _matches(r, params)
            ]
            if not matches:
                self.reply(handler, 404, outcome("not-found", f"no {kind} with {params}"))
                return
            if len(matches) > 1:
                self.reply(handler, 412, outcome("multiple-matches", f"{len(matches)} {kind}"))
                return
            resource = matches[0]
            updated = copy.deepcopy(resource)
            try:
                _apply(updated, kind, body)
            except ValueError as error:
                self.reply(handler, 422, outcome("processing", str(error)))
                return
            resource.clear()
            resource.update(updated)
            self.reply(handler, 200, resource)


def _identifier_matches(resource: dict[str, Any], token: str) -> bool:
    system, _, value = token.partition("|")
    return any(
        i.get("system") == system and i.get("value") == value
        for i in resource.get("identifier", [])
    )


def _matches(resource: dict[str, Any], criteria: dict[str, str]) -> bool:
    for name, value in criteria.items():
        if name == "mailbox-mss":
            if not any(
                fold(t.get("value", "")).startswith(fold(value))
                for t in resource.get("telecom", [])
            ):
                return False
        elif name == "identifier":
            if not _identifier_matches(resource, value):
                return False
        elif name == "practitioner.identifier":
            ident = resource.get("practitioner", {}).get("identifier", {})
            if f"{ident.get('system')}|{ident.get('value')}" != value:
                return False
        elif name in ("family", "given"):
            names = resource.get("name", [{}])[0]
            text = names.get("family", "") if name == "family" else " ".join(names.get("given", []))
            if not fold(text).startswith(fold(value)):
                return False
        elif name in ("address-city", "address-postalcode"):
            key = "city" if name == "address-city" else "postalCode"
            if not any(
                fold(a.get(key, "")).startswith(fold(value)) for a in resource.get("address", [])
            ):
                return False
    return True


def _parts(parameter: dict[str, Any]) -> dict[str, Any]:
    parts: dict[str, Any] = {}
    for part in parameter.get("part", []):
        value = next((v for k, v in part.items() if k.startswith("value")), None)
        parts[part["name"]] = value
    return parts


def _apply(resource: dict[str, Any], kind: str, body: Any) -> None:
    """FHIR Patch (R4 §3.1.0.6, FHIRPath Patch) restricted to what publication uses."""
    if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
        raise ValueError("the body is not a Parameters resource")
    telecom: list[dict[str, Any]] = resource.setdefault("telecom", [])
    for parameter in body.get("parameter", []):
        if parameter.get("name") != "operation":
            raise ValueError(f"unexpected parameter {parameter.get('name')!r}")
        parts = _parts(parameter)
        operation, path = parts.get("type"), parts.get("path", "")
        if operation == "insert":
            if path != f"{kind}.telecom":
                raise ValueError(f"insert: unsupported path {path!r}")
            value = parts.get("value")
            if not isinstance(value, dict) or any(
                t.get("value") == value.get("value") for t in telecom
            ):
                raise ValueError("insert: the mailbox exists already")
            telecom.insert(int(parts.get("index", 0)), value)
            continue
        match = _WHERE.match(path)
        if match is None or match.group(1) != kind:
            raise ValueError(f"{operation}: unsupported path {path!r}")
        address = match.group(2)
        index = next((i for i, t in enumerate(telecom) if t.get("value") == address), None)
        if operation == "delete":
            if index is not None:
                del telecom[index]
        elif operation == "replace":
            value = parts.get("value")
            if index is None:
                raise ValueError(f"replace: no mailbox {address}")
            if not isinstance(value, dict) or value.get("value") != address:
                raise ValueError("replace: the address of a mailbox cannot change")
            telecom[index] = value
        else:
            raise ValueError(f"unsupported operation {operation!r}")
