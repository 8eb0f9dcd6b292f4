"""Header edits made on the way in: trace fields and the fields a submission
server completes (RFC 6409 §8).

These functions look only at the header block (the bytes before the first
empty line); they never parse a body, so they cost the same for a 4 KB note
and a 25 MB scan.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import ipaddress
import re
import secrets

_HEADER_END = re.compile(rb"\r?\n\r?\n")


def header_block(content: bytes) -> bytes:
    """The header section, without the empty line that ends it."""
    if content.startswith((b"\r\n", b"\n")):
        return b""
    match = _HEADER_END.search(content)
    return content if match is None else content[: match.start()]


def has_field(headers: bytes, name: str) -> bool:
    """Whether a header field is present (field names are case-insensitive, RFC 5322 §1.2.2)."""
    pattern = rb"(?im)^" + re.escape(name.encode("ascii")) + rb"[ \t]*:"
    return re.search(pattern, headers) is not None


def rfc5322_date(moment: dt.datetime) -> str:
    """RFC 5322 §3.3 date-time, e.g. ``Sat, 21 Nov 2026 23:50:12 +0000``."""
    return email.utils.format_datetime(moment)


def make_message_id(envelope_id: str, hostname: str) -> str:
    """RFC 5322 §3.6.4 msg-id, unique by the envelope id and 64 random bits."""
    return f"<{envelope_id}.{secrets.token_hex(8)}@{hostname}>"


def received_field(
    *,
    helo: str,
    remote_ip: str,
    hostname: str,
    protocol: str,
    envelope_id: str,
    tls: str | None,
    recipient: str | None,
    moment: dt.datetime,
) -> bytes:
    """A Received trace field (RFC 5321 §4.4), folded on CRLF + TAB.

    ``protocol`` is a WITH keyword of the IANA "Mail Transmission Types"
    registry (RFC 3848: ESMTP, ESMTPS, ESMTPA, ESMTPSA; RFC 6531 §3.7.3: UTF8SMTP...).
    ``recipient`` is named only for single-recipient messages, so one recipient's
    copy never discloses the others (RFC 5321 §7.2).
    """
    helo = _printable(helo) or "unknown"
    lines = [
        f"Received: from {helo} ({_address_literal(remote_ip)})",
        f"\tby {hostname} (mssd) with {protocol} id {envelope_id}",
    ]
    if tls:
        lines.append(f"\t({_printable(tls)})")
    lines[-1] += f"\r\n\tfor <{recipient}>;" if recipient else ";"
    lines.append(f"\t{rfc5322_date(moment)}")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8", "surrogateescape")


def _address_literal(remote_ip: str) -> str:
    """The client's address as the TCP-info of a Received field (RFC 5321 §4.4):
    an address-literal (RFC 5321 §4.1.3), ``[192.0.2.1]`` or
    ``[IPv6:2001:db8::1]``. An IPv4-mapped IPv6 address (a dual-stack socket, a
    PROXY header) is the IPv4 client it stands for; a zone index (``%eth0``) has
    no place in IPv6-addr and is dropped."""
    try:
        address = ipaddress.ip_address(remote_ip)
    except ValueError:
        return f"[{_printable(remote_ip)}]"
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return f"[{address.ipv4_mapped}]"
        return f"[IPv6:{address.compressed.partition('%')[0]}]"
    return f"[{address}]"


def _printable(text: str) -> str:
    """Client-supplied text may not break the header: keep visible ASCII only."""
    return "".join(ch for ch in text if 0x21 <= ord(ch) < 0x7F or ch == " ")[:200]


def complete_submission(
    content: bytes, *, envelope_id: str, hostname: str, moment: dt.datetime
) -> bytes:
    """Header fields an MSA adds when the client left them out (RFC 6409 §8.2
    Message-ID, §8.3 Date), placed before the client's own fields."""
    headers = header_block(content)
    added = b""
    if not has_field(headers, "Date"):
        added += f"Date: {rfc5322_date(moment)}\r\n".encode("ascii")
    if not has_field(headers, "Message-ID"):
        added += f"Message-ID: {make_message_id(envelope_id, hostname)}\r\n".encode("ascii")
    return added + content
