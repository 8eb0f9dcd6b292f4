"""What never changes about a message in a folder, kept once per process.

A placement's internal date, size and content digest are fixed when its UID is
given (RFC 9051 §2.3.1.1: a UID names one message for the folder's
UIDVALIDITY, and mssd never reuses one; folder ids are never reused either), so
FETCH answers them from memory and reads the store only for messages it has
not seen yet: a client listing the newest messages again and again costs no
query.

Invariants:
- only immutable facts are used from a cached row: flags and modseqs always
  come from the session's view;
- whether a message is still in the folder is the folder index's business
  (``index.py``): the cache may hold rows of expunged messages, and callers
  drop those the index no longer has, as the store would;
- bounded: at most ``max_entries`` rows, least recently used first out.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

from mssd.store.mailstore import MailStore, MessageRow


class FactCache:
    """Stored rows by (folder id, UID); at most ``max_entries`` (0: keep none)."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._rows: OrderedDict[tuple[int, int], MessageRow] = OrderedDict()

    def __len__(self) -> int:
        return len(self._rows)

    async def rows(
        self,
        store: MailStore,
        folder_id: int,
        uids: Sequence[int],
        present: Callable[[int], bool],
    ) -> dict[int, MessageRow]:
        """The row of each UID still in the folder (``present``), by UID:
        cached ones from memory, the others in one read."""
        found: dict[int, MessageRow] = {}
        missing: list[int] = []
        cached = self._rows
        for uid in uids:
            row = cached.get((folder_id, uid))
            if row is None:
                missing.append(uid)
            elif present(uid):
                cached.move_to_end((folder_id, uid))
                found[uid] = row
        if missing:
            for row in await store.messages(folder_id, missing):
                found[row.uid] = row
                self._keep(folder_id, row)
        return found

    def _keep(self, folder_id: int, row: MessageRow) -> None:
        if self.max_entries <= 0:
            return
        self._rows[(folder_id, row.uid)] = row
        while len(self._rows) > self.max_entries:
            self._rows.popitem(last=False)
