"""Faults between two operators: B down, then back; A restarted with mail queued; a delay
report sent once; A killed (SIGKILL) in the middle of relaying 1,000 messages. Real
``mssd serve`` processes on SQLite and PostgreSQL."""

from __future__ import annotations

import re
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import PkiBundle, run, store_url_for
from relay_helpers import (
    inbox_count,
    make_operator,
    messages,
    queue_contents,
    queue_counts,
    queue_entries,
    seed_operator,
    start_operator,
    submit,
    submit_many,
    wait_for,
    wait_messages,
)

from mssd.config import RelaySettings


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


KILLED_COUNT = 1000
LEASE_SECONDS = 8
"""Short, so that A takes over its dead claims soon after its restart; still far longer
than one claimed batch takes to send on a loaded machine (about a second)."""


def numbers(contents: list[bytes]) -> list[int]:
    """The message numbers (``Subject: tue N``) of stored or queued messages."""
    found = [int(n) for n in re.findall(rb"^Subject: tue (\d+)\r?$", b"".join(contents), re.M)]
    assert len(found) == len(contents)
    return found


def test_a_killed_while_relaying_sends_again_only_what_b_had_just_accepted(
    backend: str, urls: list[str], tmp_path: Path, test_pki: PkiBundle
) -> None:
    """A is SIGKILLed while relaying 1,000 messages to B; after A's restart every message
    reaches B, and the only duplicates are messages B had accepted while A had not yet
    recorded their 250 (RFC 5321 §6.1: a duplicate rather than a loss).

    The bound, from ``mssd/smtp/outcomes.py``: a worker records each outcome as the peer
    answers, and claims no more than ``relay.batch_size`` entries in all while earlier
    claims are unrecorded. So at the instant of the kill at most ``batch_size`` entries
    are ``sending``, and only those can reach B twice."""
    bound = RelaySettings().batch_size
    op_a = make_operator(test_pki.dev, "A", "tue-a.mssd.test", "1750000025", backend)
    op_b = make_operator(test_pki.dev, "B", "tue-b.mssd.test", "1750000026", backend)
    run(seed_operator(urls[0], op_a, ("docteur",)))
    run(seed_operator(urls[1], op_b, ("docteur",)))
    trust = {"whitelisted": [op_a, op_b]}
    a = start_operator(op_a, urls[0], test_pki, tmp_path / "a", routes=[op_b], **trust,  # type: ignore[arg-type]
                       MSSD_RELAY_LEASE_SECONDS=str(LEASE_SECONDS))  # fmt: skip
    b = None
    try:
        a_user, b_user = op_a.user(), op_b.user()
        bodies = [
            f"Subject: tue {n}\nMessage-ID: <tue.{n}@{op_a.domain}>\n\nmessage {n}\n".encode()
            for n in range(KILLED_COUNT)
        ]
        # B is down while A accepts the messages: all 1,000 wait in A's queue, so that A
        # is relaying flat out when it is killed.
        submit_many(a, a_user, b_user, bodies, sessions=4)
        assert sum(queue_counts(a).values()) == KILLED_COUNT
        b = start_operator(op_b, urls[1], test_pki, tmp_path / "b", routes=[op_a], **trust)  # type: ignore[arg-type]
        # Killed in the middle of a claimed batch, not between two (A relays a batch in a
        # fraction of a second, then may wait for the next entries to be due).
        wait_for(
            lambda: (
                inbox_count(b, b_user) >= KILLED_COUNT // 5
                and queue_counts(a).get("sending", 0) >= 20
            ),
            60,
            "B to receive some, with A in the middle of a batch",
        )
        a.stop(signal.SIGKILL)
        time.sleep(1.0)  # B finishes the transaction whose data had fully arrived, if any
        before = numbers(messages(b, b_user))
        sending = set(numbers(queue_contents(a, ("sending",))))
        assert 0 < len(before) < KILLED_COUNT, "A was killed before or after relaying"
        assert len(set(before)) == len(before)  # no duplicate before the kill
        assert 0 < len(sending) <= bound
        a.start()
        # Every entry recorded delivered: B had committed each before its 250.
        wait_for(
            lambda: queue_counts(a) == {"delivered": KILLED_COUNT},
            60 + LEASE_SECONDS,
            "A to deliver everything",
        )
        received = Counter(numbers(messages(b, b_user)))
        duplicates = {n for n, copies in received.items() if copies > 1}
        print(f"\n{backend}: {len(before)} at B when A was killed, {len(sending)} in flight, "
              f"{len(duplicates)} duplicate(s) after the restart")  # fmt: skip
        assert set(received) == set(range(KILLED_COUNT))
        assert max(received.values()) <= 2
        # Exactly the messages B had accepted whose 250 A had not recorded yet.
        assert duplicates == sending & set(before)
        assert len(duplicates) <= bound
    finally:
        a.stop()
        if b is not None:
            b.stop()
