"""The per-process cache of immutable message facts (mssd.imap.facts): rows
are read from the store once, never beyond the bound, and a message the
folder index no longer has is left out, as the store would leave it out."""

from __future__ import annotations

import datetime as dt

from conftest import PER, PkiBundle, seed

from mssd.imap.facts import FactCache
from mssd.store.accounts import StoreAccounts
from mssd.store.engine import create_engine, dispose
from mssd.store.mailstore import MailStore, MessageRow


class CountingStore(MailStore):
    reads = 0

    async def messages(self, folder_id: int, uids: list[int]) -> list[MessageRow]:  # type: ignore[override]
        self.reads += 1
        return await super().messages(folder_id, uids)


async def test_facts_are_read_once_bounded_and_expunged_ones_left_out(
    store_url: str, test_pki: PkiBundle
) -> None:
    await seed(store_url, test_pki)
    engine = create_engine(store_url)
    store = CountingStore(engine)
    try:
        account = await StoreAccounts(engine).by_login(PER)
        assert account is not None
        inbox = await store.folder(account.id, "INBOX")
        assert inbox is not None
        moment = dt.datetime(2026, 11, 22, 8, 30, tzinfo=dt.UTC)
        uids = [
            await store.append(
                inbox.id,
                b"Subject: %d\r\n\r\n%s\r\n" % (n, b"x" * n),
                flags=frozenset(),
                internal_date=moment,
            )
            for n in range(1, 5)
        ]
        cache = FactCache(max_entries=3)
        everything = await cache.rows(store, inbox.id, uids[:3], lambda uid: True)
        assert store.reads == 1
        assert [(r.uid, r.size, r.internal_date) for r in everything.values()] == [
            (uid, len(b"Subject: %d\r\n\r\n%s\r\n" % (n, b"x" * n)), moment)
            for n, uid in enumerate(uids[:3], start=1)
        ]
        again = await cache.rows(store, inbox.id, uids[:3], lambda uid: True)
        assert again == everything and store.reads == 1
        # The index says the second message is gone: the cache does not answer it.
        gone = uids[1]
        assert sorted(await cache.rows(store, inbox.id, uids[:3], lambda uid: uid != gone)) == [
            uids[0],
            uids[2],
        ]
        # A fourth row pushes out the least recently used one, never more than 3 kept.
        await cache.rows(store, inbox.id, [uids[3]], lambda uid: True)
        assert len(cache) == 3 and store.reads == 2
        await cache.rows(store, inbox.id, [uids[1]], lambda uid: True)
        assert store.reads == 3
    finally:
        await dispose(engine)
