"""Faults between two operators: B down, then back; A restarted with mail queued; a delay
report sent once. Real ``mssd serve`` processes on SQLite and PostgreSQL."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import PkiBundle, run, store_url_for
from relay_helpers import (
    make_operator,
    messages,
    queue_entries,
    seed_operator,
    start_operator,
    submit,
    wait_for,
    wait_messages,
)


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def urls(backend: str, tmp_path: Path) -> Iterator[list[str]]:
    """A store for A and one for B."""
    base = tmp_path / "stores"
    generators = [store_url_for(backend, base / name) for name in ("a", "b")]
    try:
        urls = []
        for name, generator in zip(("a", "b"), generators, strict=True):
            (base / name).mkdir(parents=True)
            urls.append(next(generator))
        yield urls
    finally:
        for generator in generators:
            for _ in generator:
                pass


def test_b_down_then_back_and_a_restarted(
    backend: str, urls: list[str], tmp_path: Path, test_pki: PkiBundle
) -> None:
    op_a = make_operator(test_pki.dev, "A", "panne-a.mssd.test", "1750000021", backend)
    op_b = make_operator(test_pki.dev, "B", "panne-b.mssd.test", "1750000022", backend)
    run(seed_operator(urls[0], op_a, ("docteur",)))
    run(seed_operator(urls[1], op_b, ("docteur",)))
    extra = {"MSSD_RELAY_DELAY_REPORT_SECONDS": "1"}
    a = start_operator(
        op_a, urls[0], test_pki, tmp_path / "a", whitelisted=[op_a, op_b], routes=[op_b],
        **extra,
    )  # fmt: skip
    b = None
    try:
        a_user, b_user = op_a.user(), op_b.user()
        for n in range(3):
            notify = "NOTIFY=DELAY,FAILURE" if n == 0 else "NOTIFY=FAILURE"
            code, _ = submit(
                a, a_user, [(b_user, notify)], f"Subject: panne {n}\n\nmessage {n}\n".encode()
            )
            assert code == 250
        # B is down: A defers and keeps trying, with the reason in the queue.
        wait_for(
            lambda: all(e.attempts >= 2 for e in queue_entries(a)) and len(queue_entries(a)),
            what="several attempts",
        )
        [entry, *_] = queue_entries(a)
        assert "cannot connect" in (entry.last_error or "")
        # Waiting longer than delay_report_seconds: one delay report, for NOTIFY=DELAY.
        [delay] = wait_messages(a, a_user, 1)
        assert re.search(rb"^Action: delayed\r$", delay, re.M)
        assert b"Will-Retry-Until: " in delay
        # A restarts with the messages still queued.
        a.stop()
        assert len(queue_entries(a)) == 3
        a.start()
        b = start_operator(
            op_b, urls[1], test_pki, tmp_path / "b", whitelisted=[op_a, op_b], routes=[op_a]
        )
        received = wait_messages(b, b_user, 3)
        time.sleep(1.5)
        received = messages(b, b_user)
        # Exactly one copy of each.
        assert sorted(re.findall(rb"Subject: panne (\d)", b"".join(received))) == [
            b"0",
            b"1",
            b"2",
        ]
        assert not queue_entries(a)
        assert len(messages(a, a_user)) == 1  # the delay report, once
    finally:
        a.stop()
        if b is not None:
            b.stop()
