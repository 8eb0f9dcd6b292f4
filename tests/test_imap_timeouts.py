"""Idle and authentication timeouts (issue: "idle and authentication
timeouts"): a client silent for ``imap.login_timeout_seconds`` before logging
in, or for ``imap.idle_timeout_seconds`` after, is told ``* BYE`` and
disconnected; one that keeps sending commands is not, however long it stays."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import PASSWORD, PER, MssdProcess, PkiBundle, serve_seeded, store_url_for
from test_imap_clients import RawImap

LOGIN_TIMEOUT = 1.5
IDLE_TIMEOUT = 2.0


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, test_pki: PkiBundle
) -> Iterator[MssdProcess]:
    workdir: Path = tmp_path_factory.mktemp(f"mssd-timeouts-{request.param}")
    for url in store_url_for(request.param, workdir):
        yield from serve_seeded(
            url,
            test_pki,
            workdir,
            MSSD_IMAP_LOGIN_TIMEOUT_SECONDS=str(LOGIN_TIMEOUT),
            MSSD_IMAP_IDLE_TIMEOUT_SECONDS=str(IDLE_TIMEOUT),
        )


def _goodbye_after(client: RawImap) -> float:
    """Seconds until the server's BYE, which must be followed by the end of the
    connection."""
    began = time.monotonic()
    assert client.response() == b"* BYE Autologout: idle for too long\r\n"
    waited = time.monotonic() - began
    assert client.reader.read() == b"", "the connection is closed after BYE"
    return waited


def test_a_client_that_never_logs_in_is_disconnected(server: MssdProcess) -> None:
    client = RawImap(server)
    try:
        waited = _goodbye_after(client)
        assert LOGIN_TIMEOUT - 0.5 < waited < LOGIN_TIMEOUT + 3
    finally:
        client.close()


def test_a_silent_session_is_disconnected_and_a_busy_one_is_not(server: MssdProcess) -> None:
    client = RawImap(server)
    try:
        _, done = client.until(client.send(f'LOGIN {PER} "{PASSWORD}"'))
        assert b" OK " in done
        # Commands for twice the idle timeout: each one starts the count again.
        until = time.monotonic() + 2 * IDLE_TIMEOUT
        while time.monotonic() < until:
            _, done = client.until(client.send("NOOP"))
            assert b" OK " in done, done
            time.sleep(IDLE_TIMEOUT / 4)
        waited = _goodbye_after(client)
        # The count began at the last answer, a pause before the wait for BYE.
        silent = IDLE_TIMEOUT - IDLE_TIMEOUT / 4
        assert silent - 0.5 < waited < silent + 3
    finally:
        client.close()
