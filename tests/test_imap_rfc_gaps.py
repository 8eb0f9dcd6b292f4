"""Conformance points found missing and closed, against a running mssd over TLS, on
SQLite and PostgreSQL: LSUB's \\Noselect parents (RFC 3501 §6.3.9), the MODSEQ a
search or a sort with a MODSEQ criterion ends with (RFC 7162 §3.1.6, §3.1.9, RFC 4731
§3.2), new mailbox names in Unicode NFC (RFC 9051 §5.1), and the name of a partial BINARY
item (RFC 3516 §4.3). What Dovecot answers to the same commands is compared in
tests/test_imap_rev2.py.
"""

from __future__ import annotations

import imaplib
import random
import re

import pytest
from conftest import PASSWORD, MssdProcess
from imapclient import IMAPClient
from test_imap_clients import new_account
from test_imap_rev2 import Client, message

from mssd.imap.mailboxes import Hierarchy, ancestors_of
from mssd.imap.names import encode_mailbox_name
from mssd.store.mailstore import FolderInfo


@pytest.fixture
def login(mssd: MssdProcess) -> str:
    return new_account(mssd, "gaps")


# -- LSUB (RFC 3501 §6.3.9) ---------------------------------------------------------


def test_lsub_percent_returns_an_unsubscribed_parent_flagged_noselect(
    mssd: MssdProcess, login: str
) -> None:
    with Client(mssd, login) as client:
        client.command('CREATE "Projets/2024/T1"')
        client.command('CREATE "Projets/Vieux"')
        for name in ("Projets", "Projets/2024", "Projets/Vieux"):
            client.command(f'UNSUBSCRIBE "{name}"')
        client.command('SUBSCRIBE "Projets/2024/T1"')
        # "%" stops at Projets and at Projets/2024, above the subscribed T1.
        assert client.command('LSUB "" "Projets%"') == [
            b'* LSUB (\\Noselect \\HasChildren) "/" "Projets"\r\n'
        ]
        assert client.command('LSUB "" "Projets/%"') == [
            b'* LSUB (\\Noselect \\HasChildren) "/" "Projets/2024"\r\n'
        ]
        # With "*" the subscribed name itself is returned, and nothing above it;
        # without a wildcard nothing stopped anywhere.
        assert client.command('LSUB "" "Projets*"') == [
            b'* LSUB (\\HasNoChildren) "/" "Projets/2024/T1"\r\n'
        ]
        assert client.command('LSUB "" "Projets"') == []
        # A subscribed parent is listed as it is, without \Noselect.
        client.command('SUBSCRIBE "Projets"')
        assert client.command('LSUB "" "Projets%"') == [b'* LSUB (\\HasChildren) "/" "Projets"\r\n']
        # LIST (SUBSCRIBED) keeps \Noselect's meaning (RFC 5258 §3.5): no such
        # parents there, RECURSIVEMATCH and CHILDINFO say it instead.
        assert client.command('LIST (SUBSCRIBED) "" "Projets/%"') == []
        assert client.command('LIST (SUBSCRIBED RECURSIVEMATCH) "" "Projets/%"') == [
            b'* LIST (\\HasChildren) "/" "Projets/2024" ("CHILDINFO" ("SUBSCRIBED"))\r\n'
        ]


def test_imapclient_lsub_sees_the_noselect_parent(mssd: MssdProcess, login: str) -> None:
    with Client(mssd, login) as client:
        client.command('CREATE "Archives/2025"')
        client.command('UNSUBSCRIBE "Archives"')
    with IMAPClient(
        "127.0.0.1", port=mssd.imaps, ssl=True, ssl_context=mssd.pki.client_context()
    ) as c:
        c.login(login, PASSWORD)
        c.subscribe_folder("Archives/2025")
        assert c.list_sub_folders("", "Archives%") == [
            ((b"\\Noselect", b"\\HasChildren"), b"/", "Archives")
        ]


def test_lsub_among_hundreds_of_folders_flags_only_the_parents_percent_stops_at(
    mssd: MssdProcess, login: str
) -> None:
    """321 folders: Classeur, 20 Classeur/Pnn, 15 Classeur/Pnn/Dmm under each."""
    parents = [f"Classeur/P{n:02}" for n in range(20)]
    leaves = [f"{p}/D{m:02}" for p in parents for m in range(15)]
    # One subscribed leaf under every third parent; P05 subscribed itself.
    subscribed = [f"Classeur/P{n:02}/D{n % 15:02}" for n in range(0, 20, 3)] + ["Classeur/P05"]
    with Client(mssd, login) as client:
        # Pipelined: hundreds of commands, one round trip.
        tags = [client.send(f'CREATE "{name}"') for name in leaves]
        tags += [client.send(f'UNSUBSCRIBE "{name}"') for name in ["Classeur", *parents, *leaves]]
        tags += [client.send(f'SUBSCRIBE "{name}"') for name in subscribed]
        for tag in tags:
            assert client.until(tag)[1].startswith(f"{tag} OK ".encode())

        noselect = [f"Classeur/P{n:02}" for n in range(0, 20, 3)]
        assert client.command('LSUB "" "Classeur/%"') == [
            b'* LSUB (\\HasChildren) "/" "Classeur/P05"\r\n'
            if name == "Classeur/P05"
            else f'* LSUB (\\Noselect \\HasChildren) "/" "{name}"\r\n'.encode()
            for name in sorted([*noselect, "Classeur/P05"])
        ]
        assert client.command('LSUB "" "Classeur%"') == [
            b'* LSUB (\\Noselect \\HasChildren) "/" "Classeur"\r\n'
        ]
        assert client.command('LSUB "Classeur/P06/" "%"') == [
            b'* LSUB (\\HasNoChildren) "/" "Classeur/P06/D06"\r\n'
        ]
        # Nothing stopped: only the subscribed names, none flagged \Noselect.
        leaves_subscribed = sorted(subscribed[:-1])
        assert client.command('LSUB "" "Classeur/%/%"') == [
            f'* LSUB (\\HasNoChildren) "/" "{name}"\r\n'.encode() for name in leaves_subscribed
        ]
        children = {name: "Has" if name == "Classeur/P05" else "HasNo" for name in subscribed}
        assert client.command('LSUB "" "Classeur*"') == [
            f'* LSUB (\\{children[name]}Children) "/" "{name}"\r\n'.encode()
            for name in sorted(subscribed)
        ]
        assert client.command('LSUB "" "Classeur/P01/%"') == []


def test_ancestors_of_is_every_name_a_descendant_lies_below() -> None:
    """The one-pass set against the definition: "a" is above "b" when "b"
    starts with "a/" (what LSUB used to test name by name)."""
    rng = random.Random(7162)
    alphabet = ["a", "b", "", "c/d"]
    names = sorted(
        {"/".join(rng.choice(alphabet) for _ in range(rng.randint(1, 5))) for _ in range(400)}
    )
    chosen = names[::7]
    above = ancestors_of(chosen)
    candidates = set(names) | {n.rpartition("/")[0] for n in names}
    assert {c for c in candidates if any(n.startswith(c + "/") for n in chosen)} == (
        above & candidates
    )
    assert all(any(n.startswith(a + "/") for n in chosen) for a in above)
    assert ancestors_of(["INBOX", "Projets/2024/T1", "Projets/2025"]) == {
        "Projets",
        "Projets/2024",
    }


def test_hierarchy_below_is_every_name_starting_with_the_name_and_a_separator() -> None:
    """LIST (... RECURSIVEMATCH) asks for each listed name's descendants: a slice
    of the sorted names, against the definition (names like "a0", "a-b", "a.b"
    sort around "a/" and must stay out)."""
    rng = random.Random(5258)
    alphabet = ["a", "b", "a0", "a-b", "a.b", "a/b", "INBOX"]
    names = {"/".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(300)}
    tree = Hierarchy(
        [
            FolderInfo(n, 1, "x@y.test", name, None, True, 1, 1, 1, "l")
            for n, name in enumerate(names)
        ]
    )
    for name in tree.names:
        expected = sorted(n for n in tree.names if n.startswith(name + "/"))
        assert tree.below(name) == expected


# -- SEARCH with a MODSEQ criterion (RFC 7162 §3.1.5, §3.1.6; RFC 4731 §3.2) ---------


def _modseqs(client: Client) -> dict[int, int]:
    lines = client.command("FETCH 1:* (MODSEQ)")
    found = (re.match(rb"\* (\d+) FETCH \(MODSEQ \((\d+)\)\)", line) for line in lines)
    return {int(m.group(1)): int(m.group(2)) for m in found if m}


def _three_messages(client: Client) -> dict[int, int]:
    """Folder Suivi with messages 1, 2, 3, whose modseqs end up 2 < 3 < 1."""
    client.command('CREATE "Suivi"')
    for subject in ("un", "deux", "trois"):
        client.append("Suivi", message(subject))
    client.command('SELECT "Suivi"')
    for seq in (2, 3, 1):
        client.command(f"STORE {seq} +FLAGS.SILENT (\\Flagged)")
    modseqs = _modseqs(client)
    assert modseqs[2] < modseqs[3] < modseqs[1]
    return modseqs


def test_search_with_modseq_ends_with_the_highest_modseq_returned(
    mssd: MssdProcess, login: str
) -> None:
    with Client(mssd, login) as client:
        modseqs = _three_messages(client)
        low, high = modseqs[2], modseqs[1]
        assert client.command(f"SEARCH MODSEQ {low}") == [
            f"* SEARCH 1 2 3 (MODSEQ {high})\r\n".encode()
        ]
        assert client.command(f"SEARCH MODSEQ {modseqs[3]} SUBJECT trois") == [
            f"* SEARCH 3 (MODSEQ {modseqs[3]})\r\n".encode()
        ]
        assert client.command(f"SEARCH NOT MODSEQ {modseqs[3]}") == [
            f"* SEARCH 2 (MODSEQ {low})\r\n".encode()
        ]
        # No MODSEQ without a match, nor without a MODSEQ criterion.
        assert client.command(f"SEARCH MODSEQ {high + 1}") == [b"* SEARCH\r\n"]
        assert client.command("SEARCH FLAGGED") == [b"* SEARCH 1 2 3\r\n"]
        (uids,) = client.command(f"UID SEARCH MODSEQ {low}")
        assert uids.endswith(f" (MODSEQ {high})\r\n".encode())


def test_esearch_with_modseq_carries_the_modseq_of_the_messages_returned(
    mssd: MssdProcess, login: str
) -> None:
    with Client(mssd, login) as client:
        modseqs = _three_messages(client)
        low, high = modseqs[2], modseqs[1]

        def esearch(options: str, modseq: int) -> bytes:
            tag = client.send(f"SEARCH RETURN ({options}) MODSEQ {modseq}")
            untagged, done = client.until(tag)
            assert done.startswith(f"{tag} OK ".encode())
            (line,) = untagged
            prefix = f'* ESEARCH (TAG "{tag}")'.encode()
            assert line.startswith(prefix)
            return line[len(prefix) :]

        # RFC 4731 §3.2: MIN or MAX alone, the modseq of that message; both, the
        # higher of the two; ALL or COUNT, the highest of every message found.
        assert esearch("MIN", low) == f" MIN 1 MODSEQ {modseqs[1]}\r\n".encode()
        assert esearch("MAX", low) == f" MAX 3 MODSEQ {modseqs[3]}\r\n".encode()
        assert esearch("MAX", modseqs[3]) == f" MAX 3 MODSEQ {modseqs[3]}\r\n".encode()
        assert esearch("MIN MAX", low) == f" MIN 1 MAX 3 MODSEQ {high}\r\n".encode()
        assert esearch("COUNT", low) == f" COUNT 3 MODSEQ {high}\r\n".encode()
        assert esearch("", modseqs[3]) == f" ALL 1,3 MODSEQ {high}\r\n".encode()
        # Nothing found: no MODSEQ (COUNT 0 is still there).
        assert esearch("MIN", high + 1) == b"\r\n"
        assert esearch("COUNT", high + 1) == b" COUNT 0\r\n"


def test_rev2_search_with_modseq_answers_esearch_with_modseq(mssd: MssdProcess, login: str) -> None:
    with Client(mssd, login, rev2=True) as client:
        modseqs = _three_messages(client)
        tag = client.send(f"UID SEARCH MODSEQ {modseqs[3]}")
        untagged, _ = client.until(tag)
        assert untagged == [f'* ESEARCH (TAG "{tag}") UID ALL 1,3 MODSEQ {modseqs[1]}\r\n'.encode()]


def test_imapclient_reads_the_modseq_of_a_search(mssd: MssdProcess, login: str) -> None:
    with Client(mssd, login) as client:
        modseqs = _three_messages(client)
    with IMAPClient(
        "127.0.0.1", port=mssd.imaps, ssl=True, ssl_context=mssd.pki.client_context()
    ) as c:
        c.login(login, PASSWORD)
        c.select_folder("Suivi")
        found = c.search(["MODSEQ", modseqs[3]])
        assert sorted(found) == [1, 3] and found.modseq == modseqs[1]


# -- SORT with a MODSEQ criterion (RFC 7162 §3.1.9) ----------------------------------


def test_sort_with_modseq_ends_with_the_highest_modseq_returned(
    mssd: MssdProcess, login: str
) -> None:
    with Client(mssd, login) as client:
        modseqs = _three_messages(client)
        low, high = modseqs[2], modseqs[1]
        # Subjects un (1), deux (2), trois (3).
        assert client.command(f"SORT (SUBJECT) UTF-8 MODSEQ {low}") == [
            f"* SORT 2 3 1 (MODSEQ {high})\r\n".encode()
        ]
        assert client.command(f"SORT (REVERSE SUBJECT) UTF-8 MODSEQ {modseqs[3]}") == [
            f"* SORT 1 3 (MODSEQ {high})\r\n".encode()
        ]
        assert client.command(f"SORT (SUBJECT) UTF-8 MODSEQ {modseqs[3]} SUBJECT trois") == [
            f"* SORT 3 (MODSEQ {modseqs[3]})\r\n".encode()
        ]
        assert client.command(f"SORT (ARRIVAL) UTF-8 OR NOT MODSEQ {modseqs[3]} SEEN") == [
            f"* SORT 2 (MODSEQ {low})\r\n".encode()
        ]
        # No MODSEQ without a match, nor without a MODSEQ criterion.
        assert client.command(f"SORT (SUBJECT) UTF-8 MODSEQ {high + 1}") == [b"* SORT\r\n"]
        assert client.command("SORT (SUBJECT) UTF-8 FLAGGED") == [b"* SORT 2 3 1\r\n"]
        (uids,) = client.command(f"UID SORT (SUBJECT) UTF-8 MODSEQ {low}")
        assert uids.endswith(f" (MODSEQ {high})\r\n".encode())
        # THREAD responses are unchanged by CONDSTORE (RFC 7162 §3.1.9).
        (threads,) = client.command(f"THREAD ORDEREDSUBJECT UTF-8 MODSEQ {low}")
        assert threads.startswith(b"* THREAD (") and b"MODSEQ" not in threads
    # IMAP4rev2 keeps the SORT response (no ESORT here), MODSEQ included.
    with Client(mssd, login, rev2=True) as client:
        client.command('SELECT "Suivi"')
        assert client.command(f"SORT (SUBJECT) UTF-8 MODSEQ {low}") == [
            f"* SORT 2 3 1 (MODSEQ {high})\r\n".encode()
        ]


def test_imaplib_reads_the_modseq_of_a_sort(mssd: MssdProcess, login: str) -> None:
    with Client(mssd, login) as client:
        modseqs = _three_messages(client)
    client = imaplib.IMAP4_SSL(
        "127.0.0.1", mssd.imaps, ssl_context=mssd.pki.client_context(), timeout=30
    )
    try:
        client.login(login, PASSWORD)
        client.select("Suivi")
        typ, data = client.sort("(SUBJECT)", "UTF-8", "MODSEQ", str(modseqs[3]))
        assert (typ, data) == ("OK", [f"3 1 (MODSEQ {modseqs[1]})".encode()])
    finally:
        client.logout()


# -- mailbox names in NFC (RFC 9051 §5.1, RFC 5198 §2) -------------------------------

NFC = "Résultats"
NFD = "Re\u0301sultats"


def test_new_names_not_in_nfc_are_refused_in_both_revisions(mssd: MssdProcess, login: str) -> None:
    refusal = (
        b"NO [CANNOT] Mailbox names must be in Unicode NFC (RFC 9051 section 5.1, RFC 5198)\r\n"
    )
    with Client(mssd, login, rev2=True) as client:
        assert client.answer(f'CREATE "{NFD}"') == ([], refusal)
        assert client.answer(f'CREATE "Labo/{NFD}"') == ([], refusal)
        assert client.answer(f'CREATE "{NFC}"')[1] == b"OK CREATE completed\r\n"
        assert client.answer(f'RENAME "{NFC}" "{NFD}"') == ([], refusal)
        assert client.command('LIST "" "R*"') == [
            f'* LIST (\\HasNoChildren) "/" "{NFC}"\r\n'.encode()
        ]
    with Client(mssd, login) as client:
        # The same name in modified UTF-7 (RFC 3501 §5.1.3) is refused alike.
        wire = encode_mailbox_name(f"Archives {NFD}", utf8=False)
        assert client.answer(f'CREATE "{wire}"') == ([], refusal)


# -- partial BINARY (RFC 3516 §4.3, RFC 9051 §7.5.2) --------------------------------


def test_partial_binary_names_its_origin_octet(mssd: MssdProcess, login: str) -> None:
    body = b"Q29tcHRlIHJlbmR1IGQnYW5hbHlzZQ=="  # base64 of "Compte rendu d'analyse"
    raw = (
        b"From: labo@x.test\r\nSubject: bilan\r\nContent-Type: text/plain\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n" + body + b"\r\n"
    )
    with Client(mssd, login) as client:
        client.command('CREATE "Bilans"')
        client.append("Bilans", raw)
        client.command('SELECT "Bilans"')
        assert client.command("FETCH 1 (BINARY.PEEK[1]<7.5>)") == [
            b"* 1 FETCH (BINARY[1]<7> ~{5}\r\nrendu)\r\n"
        ]
        # BINARY.SIZE is of the whole decoded part, whatever was fetched.
        assert client.command("FETCH 1 (BINARY.SIZE[1])") == [b"* 1 FETCH (BINARY.SIZE[1] 22)\r\n"]
