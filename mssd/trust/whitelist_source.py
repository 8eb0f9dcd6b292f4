"""Fetching the bytes of the whitelist and of its checksum file: a local file or HTTPS.

This module only moves bytes; ``mssd.trust.whitelist`` decides what they mean. It never
follows a redirect to plain HTTP, never reads more than :data:`MAX_BYTES`, and verifies
the HTTPS server with the TLS policy of ``mssd.trust.tls`` (the configured CA bundle, or
the system store).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from mssd.trust.tls import client_context

# The 2025 list is 3.7 MB; a source ten times larger than that is not the list.
MAX_BYTES = 64 * 1024 * 1024


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
    context = await asyncio.to_thread(client_context, ca_file=ca_file)
    try:
        async with (
            httpx.AsyncClient(
                verify=context, timeout=timeout_seconds, follow_redirects=True
            ) as client,
            client.stream("GET", source) as response,
        ):
            if response.url.scheme != "https":
                raise SourceError(f"{describe(source)} redirected to {response.url.scheme}://")
            if response.status_code != 200:
                raise SourceError(f"{describe(source)}: HTTP {response.status_code}")
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_BYTES:
                    raise SourceError(f"{describe(source)}: larger than {MAX_BYTES} bytes")
            return bytes(body)
    except httpx.HTTPError as error:
        raise SourceError(f"{describe(source)}: {error or type(error).__name__}") from None


def _read_file(path: Path) -> bytes:
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_BYTES + 1)
    except OSError as error:
        raise SourceError(f"{path}: {error.strerror or error}") from None
    if len(data) > MAX_BYTES:
        raise SourceError(f"{path}: larger than {MAX_BYTES} bytes")
    return data
