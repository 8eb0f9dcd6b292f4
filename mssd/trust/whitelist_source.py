"""Fetching the bytes of the whitelist and of its checksum file: a local file or HTTPS.

This module only moves bytes; ``mssd.trust.whitelist`` decides what they mean. It
follows at most :data:`MAX_REDIRECTS` redirects, each checked before it is taken (only to
``https://``: a hop to plain HTTP is refused, nothing is sent in clear), never reads more
than :data:`MAX_BYTES`, and verifies the HTTPS server with the TLS policy of
``mssd.trust.tls`` (the configured CA bundle, or the system store).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from mssd.trust.tls import TlsConfigError, client_context

# The 2025 list is 3.7 MB; a source ten times larger than that is not the list.
MAX_BYTES = 64 * 1024 * 1024
MAX_REDIRECTS = 5


class SourceError(Exception):
    """The source could not be read (file missing, HTTP error, timeout); the message says which."""


def is_url(source: str) -> bool:
    return "://" in source


def describe(source: str) -> str:
    """The source as logs and the store show it (never with credentials in the URL)."""
    if is_url(source):
        url = httpx.URL(source)
        return str(url.copy_with(username=None, password=None, query=None))
    return str(Path(source))


async def fetch(source: str, *, ca_file: Path | None, timeout_seconds: float) -> bytes:
    """The bytes at ``source`` (a file path or an ``https://`` URL)."""
    if not is_url(source):
        return await asyncio.to_thread(_read_file, Path(source))
    if not source.startswith("https://"):
        raise SourceError(f"{describe(source)}: only https:// URLs are fetched")
    try:
        context = await asyncio.to_thread(client_context, ca_file=ca_file)
    except TlsConfigError as error:
        # A broken CA setting is this source's failure, reported like the others.
        raise SourceError(f"{describe(source)}: whitelist.ca_file: {error}") from None
    try:
        # Redirects are followed here, not by httpx, so that each hop's scheme is
        # checked before the request is sent (RFC 9110 §15.4: the target is the
        # Location field, relative to the request's URL).
        async with httpx.AsyncClient(
            verify=context, timeout=timeout_seconds, follow_redirects=False
        ) as client:
            url = httpx.URL(source)
            for _ in range(MAX_REDIRECTS + 1):
                async with client.stream("GET", url) as response:
                    if response.is_redirect:
                        url = url.join(response.headers["Location"])
                        if url.scheme != "https":
                            raise SourceError(
                                f"{describe(source)}: redirected to {describe(str(url))}; "
                                "only https:// is followed"
                            )
                        continue
                    if response.status_code != 200:
                        raise SourceError(f"{describe(source)}: HTTP {response.status_code}")
                    return await _read_body(source, response)
            raise SourceError(f"{describe(source)}: more than {MAX_REDIRECTS} redirects")
    except httpx.HTTPError as error:
        raise SourceError(f"{describe(source)}: {error or type(error).__name__}") from None


async def _read_body(source: str, response: httpx.Response) -> bytes:
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > MAX_BYTES:
            raise SourceError(f"{describe(source)}: larger than {MAX_BYTES} bytes")
    return bytes(body)


def _read_file(path: Path) -> bytes:
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_BYTES + 1)
    except OSError as error:
        raise SourceError(f"{path}: {error.strerror or error}") from None
    if len(data) > MAX_BYTES:
        raise SourceError(f"{path}: larger than {MAX_BYTES} bytes")
    return data
