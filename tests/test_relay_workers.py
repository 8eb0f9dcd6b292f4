"""Two mssd processes of one operator on one PostgreSQL: both relay workers take entries
from the shared queue (SELECT ... FOR UPDATE SKIP LOCKED) and no message reaches the peer
twice."""

from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path

from conftest import PkiBundle, run, store_url_for
from relay_helpers import (
    free_port,
    make_operator,
    messages,
    queue_entries,
    seed_operator,
    start_operator,
    submit,
    wait_for,
)

COUNT = 60


def test_two_processes_share_the_queue_without_duplicates(
    tmp_path: Path, test_pki: PkiBundle
) -> None:
    op_a = make_operator(test_pki.dev, "A", "deux-a.mssd.test", "1750000041", "workers")
    op_a2 = dataclasses.replace(op_a, mta_port=free_port())
    op_b = make_operator(test_pki.dev, "B", "deux-b.mssd.test", "1750000042", "workers")
    url_a = store_url_for("postgresql", tmp_path / "a")
    url_b = store_url_for("sqlite", tmp_path / "b")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a_url, b_url = next(url_a), next(url_b)
    servers = []
    try:
        run(seed_operator(a_url, op_a, ("docteur",)))
        run(seed_operator(b_url, op_b, ("docteur",)))
        common = {"whitelisted": [op_a, op_b], "routes": [op_b]}
        a1 = start_operator(op_a, a_url, test_pki, tmp_path / "a1", **common)  # type: ignore[arg-type]
        servers.append(a1)
        a2 = start_operator(op_a2, a_url, test_pki, tmp_path / "a2", **common)  # type: ignore[arg-type]
        servers.append(a2)
        a_user, b_user = op_a.user(), op_b.user()
        # B is down while the messages are accepted: they wait in the shared queue.
        for n in range(COUNT):
            server = a1 if n % 2 else a2
            body = f"Subject: lot {n}\n\nmessage {n}\n".encode()
            assert submit(server, a_user, [(b_user, "NOTIFY=NEVER")], body)[0] == 250
        b = start_operator(op_b, b_url, test_pki, tmp_path / "b", whitelisted=[op_a, op_b],
                           routes=[op_a])  # fmt: skip
        servers.append(b)
        wait_for(lambda: len(messages(b, b_user)) >= COUNT, 60, f"{COUNT} messages at B")
        time.sleep(1.5)
        numbers = re.findall(rb"Subject: lot (\d+)", b"".join(messages(b, b_user)))
        assert sorted(int(n) for n in numbers) == list(range(COUNT))  # each exactly once
        assert not queue_entries(a1)
        relayed = [
            len(re.findall(r" relayed to <", (server.log or Path()).read_text()))
            for server in (a1, a2)
        ]
        assert sum(relayed) == COUNT, relayed
    finally:
        for server in servers:
            server.stop()
        for generator in (url_a, url_b):
            for _ in generator:
                pass
