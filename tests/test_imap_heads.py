"""Header blocks read from the start of a message (mssd.imap.heads): whatever
the cut, a Head answers the header items exactly as the whole message does."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mssd.imap import heads as heads_module
from mssd.imap.fetchdata import SectionSpec, envelope, section
from mssd.imap.heads import Head, HeadCache, head_of
from mssd.mime.structure import parse

CORPUS = Path(__file__).parent / "corpus"
MESSAGES = {path.stem: path.read_bytes() for path in sorted(CORPUS.glob("*.eml"))}
HEADER_SPECS = [
    SectionSpec(text="HEADER"),
    SectionSpec(text="HEADER.FIELDS", fields=("From", "Subject", "Date", "X-Absent")),
    SectionSpec(text="HEADER.FIELDS", fields=("TO", "content-type")),
    SectionSpec(text="HEADER.FIELDS.NOT", fields=("Received", "Subject")),
]
ODD_MESSAGES = {
    "no empty line, then a body": b"From: a@b.test\r\nSubject: x\r\nnot a field\r\nbody\r\n",
    "header only, no empty line": b"From: a@b.test\r\nSubject: x\r\n",
    "header only, no final line break": b"From: a@b.test\r\nSubject: x",
    "empty line only": b"\r\n",
    "empty": b"",
    "bare LF": b"From: a@b.test\nSubject: x\n\nbody\n",
    "folded at the cut": b"Subject: one\r\n two\r\n three\r\n\r\nbody\r\n",
}


def answers(raw: bytes, head_raw: bytes) -> None:
    root, head_root = parse(raw), parse(head_raw)
    for spec in HEADER_SPECS:
        assert section(head_raw, head_root, spec) == section(raw, root, spec), spec
    assert envelope(head_raw, head_root) == envelope(raw, root)


@pytest.mark.parametrize("name", sorted(MESSAGES) + sorted(ODD_MESSAGES))
def test_head_answers_as_the_whole_message(name: str) -> None:
    raw = MESSAGES.get(name) or ODD_MESSAGES[name]
    head = head_of(raw, whole=True)
    assert head is not None
    assert raw.startswith(head.raw)
    answers(raw, head.raw)


@settings(max_examples=300, deadline=None)
@given(name=st.sampled_from(sorted(MESSAGES) + sorted(ODD_MESSAGES)), data=st.data())
def test_any_cut_is_exact_or_refused(name: str, data: st.DataObject) -> None:
    raw = MESSAGES.get(name) or ODD_MESSAGES[name]
    cut = data.draw(st.integers(0, len(raw)))
    head = head_of(raw[:cut], whole=cut == len(raw))
    if head is None:
        assert cut < len(raw)  # not enough read: the caller reads the whole message
    else:
        answers(raw, head.raw)


def test_cache_is_bounded_in_octets_and_drops_the_oldest() -> None:
    cost = 600 + heads_module._OVERHEAD
    cache = HeadCache(max_bytes=3 * cost)
    heads = [Head(bytes([65 + i]) * 600, parse(b"")) for i in range(5)]
    for index, head in enumerate(heads):
        cache._keep(f"sha{index}", head)
    # Room for three: the three newest stay.
    assert list(cache._entries) == ["sha2", "sha3", "sha4"]
    cache._keep("big", Head(b"x" * 4 * cost, parse(b"")))
    assert "big" not in cache._entries
    assert HeadCache(0)._entries == {}
