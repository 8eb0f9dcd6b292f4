"""DKIM (RFC 6376): signing relayed mail, verifying received mail, generating keys.

Signing happens when the relay sends a message (per attempt; the stored message is never
changed), with the key of the envelope sender's domain when ``dkim.key_dir`` holds one.
Verification happens on port 25 before the message is stored, and its outcome is written
in an ``Authentication-Results`` header field (RFC 8601) whose authserv-id is our host
name. Verification is never a reason to refuse: a missing or broken signature is a fact
recorded for the reader and for filters, not a policy.

Invariants:
- Key look-ups are bounded by ``dkim.dns_timeout_seconds`` and can be answered from a
  file of TXT records (``dkim.txt_records_file``) before DNS: tests and closed networks
  never depend on public DNS.
- dkimpy is synchronous: signing and verification run in this module's own bounded
  pool of threads (:func:`dkim_threads`), never in the event loop's default executor,
  which name resolution and the store share. Verification also bounds its own work (a
  deadline for the key look-ups, at most ``MAX_SIGNATURES`` signatures tried), so a
  thread whose caller stopped waiting finishes soon after instead of running on.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import logging
import os
import re
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path

import authres
import dkim
import dns.exception
import dns.resolver
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from dkim.util import parse_tag_value

log = logging.getLogger(__name__)

# RFC 6376 §5.4.1 recommends these; the MSSanté fields are signed too, so that a relay
# cannot change which patient (INS) or document (CODECDA) a message is about unnoticed.
_SIGNED = (
    b"from", b"sender", b"reply-to", b"subject", b"date", b"message-id", b"to", b"cc",
    b"mime-version", b"content-type", b"content-transfer-encoding", b"in-reply-to",
    b"references", b"x-mss-nil", b"x-mss-codecda", b"x-mss-ins", b"x-mss-mes",
)  # fmt: skip
_KEY_CACHE_SECONDS = 60.0
_DOMAIN = re.compile(r"^[a-z0-9.-]+$")
MAX_SIGNATURES = 5
"""Signatures tried per message; RFC 6376 §6.1 lets a verifier limit them (a message
with many signatures would otherwise cost one key look-up and one body hash each)."""
_THREADS = 4

DnsFunction = Callable[..., bytes | None]


@cache
def dkim_threads() -> concurrent.futures.ThreadPoolExecutor:
    """The threads DKIM work runs on, shared by signing and verification (see the
    module docstring); a job that waits for a thread is cancelled if its caller gives up."""
    return concurrent.futures.ThreadPoolExecutor(_THREADS, thread_name_prefix="mssd-dkim")


def key_path(key_dir: Path, domain: str, selector: str) -> Path:
    return key_dir / f"{domain.lower()}.{selector}.key"


def generate_key(
    key_dir: Path, domain: str, selector: str, *, force: bool = False
) -> tuple[Path, str]:
    """Write a new RSA 2048 key (0600) for ``domain``; return its path and the TXT record
    value to publish at ``<selector>._domainkey.<domain>`` (RFC 6376 §3.6.1)."""
    if not _DOMAIN.match(domain.lower()) or not re.fullmatch(r"[A-Za-z0-9-]+", selector):
        raise ValueError(f"unusable domain {domain!r} or selector {selector!r}")
    key_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = key_path(key_dir, domain, selector)
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists (use --force to replace it)")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    temporary = path.with_suffix(".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    os.replace(temporary, path)
    public = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return path, f"v=DKIM1; k=rsa; p={base64.b64encode(public).decode('ascii')}"


class DkimSigner:
    """Signs with the key of a domain when there is one (keys re-read every minute)."""

    def __init__(self, key_dir: Path, selector: str) -> None:
        self._key_dir = key_dir
        self._selector = selector
        self._keys: dict[str, tuple[float, bytes | None]] = {}

    def _key(self, domain: str) -> bytes | None:
        now = time.monotonic()
        cached = self._keys.get(domain)
        if cached is not None and cached[0] > now:
            return cached[1]
        try:
            data: bytes | None = key_path(self._key_dir, domain, self._selector).read_bytes()
        except OSError:
            data = None
        self._keys[domain] = (now + _KEY_CACHE_SECONDS, data)
        return data

    def sign(self, content: bytes, domain: str) -> bytes:
        """``content`` with a DKIM-Signature field on top, or unchanged without a key."""
        domain = domain.lower()
        if not domain or not _DOMAIN.match(domain):
            return content
        key = self._key(domain)
        if key is None:
            return content
        head = content.split(b"\r\n\r\n", 1)[0].lower()
        present = [name for name in _SIGNED if b"\n" + name + b":" in b"\n" + head]
        if b"from" not in present:
            return content  # RFC 6376 §5.4: From must be signed; nothing to sign with.
        try:
            signature = dkim.sign(
                content,
                self._selector.encode("ascii"),
                domain.encode("ascii"),
                key,
                canonicalize=(b"relaxed", b"relaxed"),
                include_headers=present,
            )
        except dkim.DKIMException as error:
            log.warning("DKIM signing for %s failed: %s; sent unsigned", domain, error)
            return content
        return bytes(signature) + content

    async def sign_async(self, content: bytes, domain: str) -> bytes:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(dkim_threads(), self.sign, content, domain)


def read_txt_records(path: Path | None) -> dict[str, bytes]:
    """``NAME VALUE`` lines (``#`` comments) -> {name: value}."""
    records: dict[str, bytes] = {}
    if path is None:
        return records
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, value = line.partition(" ")
        records[name.rstrip(".").lower()] = value.strip().strip('"').encode("ascii")
    return records


def make_dns_function(
    records: dict[str, bytes],
    *,
    use_dns: bool,
    timeout: float,
    resolver: dns.resolver.Resolver | None = None,
) -> DnsFunction:
    """A dkimpy ``dnsfunc``: the given records first, then DNS (bounded; ``resolver``, or
    the system's). None when there is no such record (the name does not exist, or holds
    no TXT); ``dkim.DnsTimeoutError`` when DNS did not say (timeout, server failure)."""

    def lookup(name: bytes | str, timeout: float = timeout) -> bytes | None:
        text = (name.decode("ascii") if isinstance(name, bytes) else name).rstrip(".").lower()
        if text in records:
            return records[text]
        if not use_dns:
            return None
        try:
            answer = (resolver or dns.resolver.get_default_resolver()).resolve(
                text, "TXT", lifetime=timeout
            )
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        except (dns.exception.DNSException, OSError) as error:
            raise dkim.DnsTimeoutError(f"key look-up for {text} failed: {error}") from None
        for rdata in answer:
            return b"".join(rdata.strings)
        return None

    return lookup


class DkimVerifier:
    """Builds the Authentication-Results field for a received message."""

    def __init__(self, authserv_id: str, dnsfunc: DnsFunction, *, timeout: float) -> None:
        self._authserv_id = authserv_id
        self._dnsfunc = dnsfunc
        self._timeout = timeout

    def results(
        self, content: bytes, deadline: float | None = None
    ) -> list[authres.DKIMAuthenticationResult]:
        """One result per signature tried; past ``deadline`` (time.monotonic) no key is
        looked up any more (``temperror`` for the signatures left)."""
        try:
            headers, _ = dkim.rfc822_parse(content)
        except dkim.DKIMException:
            return []
        signatures = [value for name, value in headers if name.lower() == b"dkim-signature"]
        results = []
        verifier = dkim.DKIM(content, timeout=int(self._timeout) or 1)
        if deadline is None:
            deadline = time.monotonic() + self._timeout * 2
        for index, value in enumerate(signatures[:MAX_SIGNATURES]):
            try:
                tags = parse_tag_value(b"".join(value.split()))
                domain = tags.get(b"d", b"").decode("ascii", "replace")
                selector = tags.get(b"s", b"").decode("ascii", "replace")
            except dkim.DKIMException:
                domain = selector = ""
            try:
                outcome = self._verify(verifier, index, deadline)
            except dkim.DKIMException:
                outcome = "neutral" if not domain else "permerror"
            results.append(
                authres.DKIMAuthenticationResult(
                    result=outcome, header_d=domain or None, header_s=selector or None
                )
            )
        return results

    def _verify(self, verifier: dkim.DKIM, index: int, deadline: float) -> str:
        """The RFC 8601 §2.7.1 result of one signature. dkimpy answers a verification
        whose key could not be had with a plain False; what the look-up did tells why
        (RFC 6376 §6.1.2): no answer is ``temperror``, no key record or an unusable one
        ``permerror``, and only a signature checked against a key can ``fail``."""
        looked_up: list[bytes | Exception | None] = []

        def lookup(name: bytes | str, timeout: float = self._timeout) -> bytes | None:
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise dkim.DnsTimeoutError("no time left for this message's key look-ups")
                record = self._dnsfunc(name, timeout=min(timeout, left))
            except dkim.DnsTimeoutError as error:
                looked_up.append(error)
                raise
            looked_up.append(record)
            return record

        if verifier.verify(idx=index, dnsfunc=lookup):
            return "pass"
        if not looked_up:
            return "fail"
        record = looked_up[-1]
        if isinstance(record, Exception):
            return "temperror"
        if not record:
            return "permerror"  # "no key for signature"
        try:
            dkim.evaluate_pk(b"key", record)
        except (dkim.KeyFormatError, ValueError):
            return "permerror"  # "key syntax error"
        return "fail"

    def header(self, content: bytes, deadline: float | None = None) -> bytes:
        """The ``Authentication-Results:`` field, CRLF-terminated (RFC 8601 §2.2)."""
        found = self.results(content, deadline)
        field = authres.AuthenticationResultsHeader(
            authserv_id=self._authserv_id,
            results=found or [authres.DKIMAuthenticationResult(result="none")],
        )
        return str(field).encode("utf-8") + b"\r\n"

    async def header_async(self, content: bytes) -> bytes:
        """:meth:`header`, on the DKIM threads, bounded in time (``dkim=temperror`` past
        it); the thread itself stops looking keys up at the same deadline."""
        budget = self._timeout * 2
        work = asyncio.get_running_loop().run_in_executor(
            dkim_threads(), self.header, content, time.monotonic() + budget
        )
        try:
            return await asyncio.wait_for(work, budget + 1)
        except TimeoutError:
            field = authres.AuthenticationResultsHeader(
                authserv_id=self._authserv_id,
                results=[authres.DKIMAuthenticationResult(result="temperror")],
            )
            return str(field).encode("utf-8") + b"\r\n"
