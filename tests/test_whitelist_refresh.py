"""Loading and refreshing the whitelist: store, disk copy, refusals, HTTPS, CLI."""

from __future__ import annotations

import asyncio
import hashlib
import http.server
import logging
import os
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from conftest import PkiBundle, write_whitelist
from sqlalchemy.ext.asyncio import AsyncEngine
from test_trust_whitelist import FULL, PARTIAL, PARTIAL_CHECKSUM

from mssd import metrics
from mssd.config import ConfigError, WhitelistSettings, load
from mssd.delivery.whitelist import REFUSED, WhitelistKeeper
from mssd.store.audit import read_audit
from mssd.store.engine import create_engine, upgrade
from mssd.store.whitelist import latest_whitelist, refusals
from mssd.trust.tls import server_context


@pytest.fixture
async def engine(store_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(store_url)
    await upgrade(engine)
    yield engine
    await engine.dispose()


def keeper(engine: AsyncEngine, tmp_path: Path, **settings: object) -> WhitelistKeeper:
    return WhitelistKeeper(engine, WhitelistSettings(**settings), tmp_path / "kept" / "list.xml")  # type: ignore[arg-type]


async def test_an_accepted_list_is_kept_in_the_store_and_on_disk(
    engine: AsyncEngine, tmp_path: Path
) -> None:
    first = keeper(engine, tmp_path, source=str(FULL))
    assert await first.load() is None
    outcome = await first.refresh()
    assert outcome.status == "updated" and "5001 domains" in outcome.message
    stored = await latest_whitelist(engine)
    assert stored is not None and stored.content == FULL.read_bytes()
    assert (tmp_path / "kept" / "list.xml").read_bytes() == FULL.read_bytes()
    # Another process (or a restart) starts from the stored list without fetching.
    second = keeper(engine, tmp_path, source=str(tmp_path / "unreachable.xml"))
    listed = await second.load()
    assert listed is not None and len(listed.domains) == 5001
    assert (await first.refresh()).status == "unchanged"


async def test_a_refresh_hashes_the_list_once(
    engine: AsyncEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hashed: list[int] = []
    real = hashlib.sha256

    class Counting:
        """hashlib.sha256, counting the bytes it is given."""

        def __init__(self, data: bytes = b"", **options: bool) -> None:
            self._hash = real(data, **options)
            hashed.append(len(data))

        def update(self, data: bytes) -> None:
            hashed.append(len(data))
            self._hash.update(data)

        def hexdigest(self) -> str:
            return self._hash.hexdigest()

    keep = keeper(engine, tmp_path, source=str(PARTIAL), checksum_source=str(PARTIAL_CHECKSUM))
    monkeypatch.setattr(hashlib, "sha256", Counting)
    assert (await keep.refresh()).status == "updated"
    assert sum(hashed) == PARTIAL.stat().st_size
    hashed.clear()
    assert (await keep.refresh()).status == "unchanged"
    assert sum(hashed) == PARTIAL.stat().st_size


async def test_every_update_and_refusal_is_audited(engine: AsyncEngine, tmp_path: Path) -> None:
    keep = WhitelistKeeper(
        engine, WhitelistSettings(source=str(PARTIAL)), tmp_path / "list.xml", actor="cli:ops"
    )
    assert (await keep.refresh()).status == "updated"
    assert (await keep.refresh()).status == "unchanged"  # nothing to audit
    assert (await keep.refresh(source=str(FULL), max_shrink=0.0)).status == "updated"
    refused = await keep.refresh(source=str(PARTIAL), max_shrink=0.1)
    assert refused.status == "refused"
    events = await read_audit(engine, action_prefix="whitelist.")
    assert [(e.actor, e.action, e.target, e.result) for e in events] == [
        ("cli:ops", "whitelist.update", str(PARTIAL), "refused:shrink"),
        ("cli:ops", "whitelist.update", str(FULL), "ok"),
        ("cli:ops", "whitelist.update", str(PARTIAL), "ok"),
    ]
    partial_sha = hashlib.sha256(PARTIAL.read_bytes()).hexdigest()
    assert events[0].details["sha256"] == partial_sha
    assert (
        events[0]
        .details["reason"]
        .startswith(
            "the new list would shrink the current one by 91% (5001 -> 516 domains, "
            "6525 -> 614 operator entries)"
        )
    )
    assert events[1].details == {
        "sha256": hashlib.sha256(FULL.read_bytes()).hexdigest(),
        "domains": 5001,
        "entries": 6525,
        "generated_at": "2025-03-13T14:54:10Z",
    }
    assert events[2].details["sha256"] == partial_sha and events[2].details["domains"] == 516


async def test_partial_list_over_the_full_one_is_refused_with_an_alert(
    engine: AsyncEngine, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    keep = keeper(engine, tmp_path, source=str(FULL))
    await keep.refresh()
    before = REFUSED.value("shrink")
    with caplog.at_level(logging.ERROR, logger="mssd.delivery.whitelist"):
        outcome = await keep.refresh(source=str(PARTIAL), checksum_source=str(PARTIAL_CHECKSUM))
    assert outcome.status == "refused"
    assert "shrink the current one by 91%" in outcome.message
    assert REFUSED.value("shrink") == before + 1
    assert 'mssd_whitelist_refused_total{reason="shrink"}' in metrics.render()
    assert any("ALERT whitelist update" in r.message for r in caplog.records)
    current = keep.current
    assert current is not None and len(current.domains) == 5001
    assert (tmp_path / "kept" / "list.xml").read_bytes() == FULL.read_bytes()
    total, recent = await refusals(engine)
    assert total == 1 and recent[0].kind == "shrink"
    stored = await latest_whitelist(engine)
    assert stored is not None and stored.content == FULL.read_bytes()
    # The same list is accepted when the administrator allows that much shrinkage.
    allowed = await keep.refresh(source=str(PARTIAL), max_shrink=0.95)
    assert allowed.status == "updated"


async def test_checksum_failure_is_refused(engine: AsyncEngine, tmp_path: Path) -> None:
    keep = keeper(engine, tmp_path, source=str(FULL), checksum_source=str(PARTIAL_CHECKSUM))
    before = REFUSED.value("checksum")
    outcome = await keep.refresh()
    assert outcome.status == "refused" and "SHA-256 mismatch" in outcome.message
    assert REFUSED.value("checksum") == before + 1
    assert keep.current is None and await latest_whitelist(engine) is None
    assert not (tmp_path / "kept" / "list.xml").exists()
    # The list the checksum file describes passes.
    assert (await keep.refresh(source=str(PARTIAL))).status == "updated"


async def until(check: Callable[[], Awaitable[bool]], seconds: float) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "not within the time allowed"
        await asyncio.sleep(0.05)


async def test_a_checksum_mismatch_is_fetched_again_soon_a_few_times(
    engine: AsyncEngine, tmp_path: Path
) -> None:
    # ANS replaces the pair: the new list is out, its checksum file not yet.
    listed, checksum = tmp_path / "list.xml", tmp_path / "checksum"
    listed.write_bytes(FULL.read_bytes())
    checksum.write_bytes(PARTIAL_CHECKSUM.read_bytes())

    def scheduled() -> WhitelistKeeper:
        return keeper(
            engine,
            tmp_path,
            source=str(listed),
            checksum_source=str(checksum),
            refresh_seconds=3600,
            checksum_retry_seconds=0.2,
        )

    async def refused_count() -> int:
        return (await refusals(engine))[0]

    async def refused_five_times() -> bool:
        return await refused_count() >= 5

    async def refused_again() -> bool:
        return await refused_count() >= 6

    async def in_force() -> bool:
        return keep.current is not None

    # A checksum that never matches: fetched at start, again after 0.2, 0.4, 0.8 and
    # 1.6 s, then only on the regular schedule (an hour).
    keep = scheduled()
    keep.start()
    try:
        await until(refused_five_times, 10)
        await asyncio.sleep(2.0)
        assert await refused_count() == 5
        assert keep.current is None
    finally:
        await keep.stop()
    # The checksum file arrives between two early retries: picked up then, not in an hour.
    keep = scheduled()
    keep.start()
    try:
        await until(refused_again, 10)
        checksum.write_text(hashlib.sha256(FULL.read_bytes()).hexdigest() + "\n")
        await until(in_force, 5)
        assert keep.current is not None and len(keep.current.domains) == 5001
    finally:
        await keep.stop()


async def test_garbage_is_refused_and_the_current_list_kept(
    engine: AsyncEngine, tmp_path: Path
) -> None:
    keep = keeper(engine, tmp_path, source=str(PARTIAL))
    await keep.refresh()
    garbage = tmp_path / "garbage.xml"
    garbage.write_bytes(b"<html><body>Service Unavailable</body></html>")
    outcome = await keep.refresh(source=str(garbage))
    assert outcome.status == "refused" and "does not parse" in outcome.message
    missing = await keep.refresh(source=str(tmp_path / "missing.xml"))
    assert missing.status == "failed" and "No such file" in missing.message
    assert keep.current is not None and len(keep.current.domains) == 516


async def test_the_disk_copy_serves_when_the_store_has_none(
    engine: AsyncEngine, tmp_path: Path
) -> None:
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "list.xml").write_bytes(PARTIAL.read_bytes())
    keep = keeper(engine, tmp_path)
    listed = await keep.load()
    assert listed is not None and len(listed.domains) == 516
    stored = await latest_whitelist(engine)
    assert stored is not None and stored.content == PARTIAL.read_bytes()


async def test_scheduled_refresh_picks_up_a_new_list(engine: AsyncEngine, tmp_path: Path) -> None:
    source = write_whitelist(tmp_path / "source.xml", {"a.mssd.test": ["CN=a,OU=1750000000"]})
    keep = keeper(engine, tmp_path, source=str(source), refresh_seconds=1)
    keep.start()
    try:
        for _ in range(50):
            if keep.current is not None:
                break
            await asyncio.sleep(0.1)
        assert keep.current is not None and list(keep.current.domains) == ["a.mssd.test"]
        write_whitelist(
            source, {"a.mssd.test": ["CN=a,OU=1750000000"], "b.mssd.test": ["CN=b,OU=1750000000"]}
        )
        for _ in range(50):
            if keep.current is not None and len(keep.current.domains) == 2:
                break
            await asyncio.sleep(0.1)
        assert keep.current.has_domain("b.mssd.test")
    finally:
        await keep.stop()


# -- HTTPS -----------------------------------------------------------------------------------


class PlainHttp:
    """A loopback plain-HTTP server that records every request and serves the list."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        recorded = self.requests

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                recorded.append(self.path)
                body = PARTIAL.read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                return None

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def plain_http() -> Iterator[PlainHttp]:
    server = PlainHttp()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def https_server(test_pki: PkiBundle, plain_http: PlainHttp) -> Iterator[str]:
    """A loopback HTTPS server (dev PKI certificate) publishing the partial list;
    ``/moved`` redirects to it over HTTPS, ``/to-http`` to the plain-HTTP server."""
    files = {"/listeblanchemssante.xml": PARTIAL, "/checksum": PARTIAL_CHECKSUM}
    redirects = {
        "/moved": "/listeblanchemssante.xml",
        "/to-http": f"{plain_http.url}/listeblanchemssante.xml",
        "/loop": "/loop",
    }

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path in redirects:
                self.send_response(302)
                self.send_header("Location", redirects[self.path])
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            path = files.get(self.path)
            if path is None:
                self.send_error(404)
                return
            body = path.read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            return None

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = server_context(test_pki.dev.server_cert, test_pki.dev.server_key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://localhost:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


async def test_list_and_checksum_over_https(
    engine: AsyncEngine, tmp_path: Path, https_server: str, test_pki: PkiBundle
) -> None:
    keep = keeper(
        engine,
        tmp_path,
        source=f"{https_server}/listeblanchemssante.xml",
        checksum_source=f"{https_server}/checksum",
        ca_file=test_pki.dev.ca_bundle,
    )
    outcome = await keep.refresh()
    assert outcome.status == "updated", outcome.message
    assert keep.current is not None and len(keep.current.domains) == 516
    missing = await keep.refresh(source=f"{https_server}/nothing-here.xml")
    assert missing.status == "failed" and "HTTP 404" in missing.message


async def test_redirects_are_followed_only_to_https(
    engine: AsyncEngine,
    tmp_path: Path,
    https_server: str,
    plain_http: PlainHttp,
    test_pki: PkiBundle,
) -> None:
    keep = keeper(engine, tmp_path, ca_file=test_pki.dev.ca_bundle)
    moved = await keep.refresh(source=f"{https_server}/moved")
    assert moved.status == "updated", moved.message
    # A hop to plain HTTP is refused before it is taken: nothing goes out in clear.
    down = await keep.refresh(source=f"{https_server}/to-http")
    assert down.status == "failed"
    assert down.message == (
        f"cannot fetch the list: {https_server}/to-http: redirected to "
        f"{plain_http.url}/listeblanchemssante.xml; only https:// is followed"
    )
    assert plain_http.requests == []
    looping = await keep.refresh(source=f"{https_server}/loop")
    assert looping.status == "failed" and "more than 5 redirects" in looping.message


async def test_an_unusable_ca_file_is_a_clear_fetch_failure(
    engine: AsyncEngine, tmp_path: Path, https_server: str
) -> None:
    missing = tmp_path / "missing-ca.pem"
    keep = keeper(engine, tmp_path, ca_file=missing)
    outcome = await keep.refresh(source=f"{https_server}/listeblanchemssante.xml")
    assert outcome.status == "failed"
    assert outcome.message == (
        f"cannot fetch the list: {https_server}/listeblanchemssante.xml: "
        f"whitelist.ca_file: CA file {missing} does not exist or is not a file"
    )
    assert keep.current is None


async def test_https_server_must_verify(
    engine: AsyncEngine, tmp_path: Path, https_server: str
) -> None:
    # Without the dev CA the loopback server's certificate is not trusted: nothing loaded.
    keep = keeper(engine, tmp_path, source=f"{https_server}/listeblanchemssante.xml")
    outcome = await keep.refresh()
    assert outcome.status == "failed" and "CERTIFICATE_VERIFY_FAILED" in outcome.message
    assert keep.current is None


# -- the command line --------------------------------------------------------------------------


def mssd_cli(store_url: str, workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSSD_")}
    env.update({"MSSD_STORE_URL": store_url, "MSSD_SERVER_VAR_DIR": str(workdir)})
    return subprocess.run(
        [sys.executable, "-m", "mssd", *args],
        env=env,
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_whitelist_commands(tmp_path: Path) -> None:
    # The store functions behind these commands run on both backends above; the command
    # line itself is exercised once (each command is a process start).
    store_url = f"sqlite+aiosqlite:///{tmp_path / 'mssd.db'}"
    assert mssd_cli(store_url, tmp_path, "db", "upgrade").returncode == 0
    empty = mssd_cli(store_url, tmp_path, "whitelist", "show")
    assert empty.returncode == 1 and "no whitelist in force" in empty.stderr
    loaded = mssd_cli(store_url, tmp_path, "whitelist", "refresh", "--source", str(FULL))
    assert loaded.returncode == 0 and "5001 domains" in loaded.stdout
    refused = mssd_cli(
        store_url,
        tmp_path,
        "whitelist",
        "refresh",
        "--source",
        str(PARTIAL),
        "--checksum-source",
        str(PARTIAL_CHECKSUM),
    )
    assert refused.returncode == 1
    assert "mssd: whitelist refused (shrink)" in refused.stderr
    shown = mssd_cli(store_url, tmp_path, "whitelist", "show")
    assert shown.returncode == 0
    assert "5001 domains" in shown.stdout and "refused updates: 1" in shown.stdout
    assert (tmp_path / "whitelist" / "listeblanchemssante.xml").read_bytes() == FULL.read_bytes()
    listed = mssd_cli(store_url, tmp_path, "whitelist", "check", "ZENIDOC.mssante.fr")
    assert listed.returncode == 0
    assert "zenidoc.mssante.fr is in the MSSanté whitelist" in listed.stdout
    assert "CN=smtp-2.mssante.adista.fr,OU=332315971500305" in listed.stdout
    unknown = mssd_cli(store_url, tmp_path, "whitelist", "check", "inconnu.mssante.fr")
    assert unknown.returncode == 1
    assert "inconnu.mssante.fr is not in the MSSanté whitelist" in unknown.stderr
    other_ou = mssd_cli(
        store_url,
        tmp_path,
        "whitelist",
        "check",
        "zenidoc.mssante.fr",
        "--dn",
        "CN=smtp-1.mssante.adista.fr, OU=1750000000, O=ADISTA, ST=Meurthe-et-Moselle (54), C=FR",
    )
    assert other_ou.returncode == 1 and "is not listed for zenidoc.mssante.fr" in other_ou.stderr


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"MSSD_WHITELIST_SOURCE": "http://example.test/l.xml"}, "whitelist.source: a URL must"),
        ({"MSSD_WHITELIST_MAX_SHRINK": "1.5"}, "whitelist.max_shrink: must be a fraction"),
        ({"MSSD_WHITELIST_CHECKSUM_SOURCE": "/tmp/checksum"}, "set whitelist.source too"),
        ({"MSSD_WHITELIST_REFRESH_SECONDS": "0"}, "whitelist.refresh_seconds"),
    ],
)
def test_whitelist_settings_are_validated(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(None, env=env)
