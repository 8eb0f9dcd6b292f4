"""The ANS whitelist parser and its replacement rules (sans I/O), on the real ANS copies."""

from __future__ import annotations

import pytest
from conftest import FIXTURES
from hypothesis import given, settings
from hypothesis import strategies as st

from mssd.trust.whitelist import (
    Whitelist,
    WhitelistError,
    WhitelistParser,
    WhitelistRefused,
    accept_update,
    check_checksum,
    normalise_domain,
    parse_checksum,
    parse_whitelist,
)

WHITELISTS = FIXTURES / "whitelist"
FULL = WHITELISTS / "listeblanchemssante-2025-03-13.xml"
PARTIAL = WHITELISTS / "listeblanchemssante-partial-head.xml"
PARTIAL_CHECKSUM = WHITELISTS / "listeblanchemssante-partial-head.checksum"

MIPIH = "CN=medimail-asip.mipih.fr,OU=318310021300028,O=GIP MIPIH,ST=Haute-Garonne (31),C=FR"
APICRYPT = (
    "CN=mailin.interop-mssante.apicrypt.org, OU=343975235300037, O=APICEM, ST=Nord (59), C=FR"
)


def document(*domains: tuple[str, list[str]], close_root: bool = True) -> bytes:
    body = "".join(
        "<Domaine><Nom>{}</Nom><Description>x</Description>{}</Domaine>".format(
            name, "".join(f"<DNCertificatOperateur>{dn}</DNCertificatOperateur>" for dn in dns)
        )
        for name, dns in domains
    )
    text = (
        '<?xml version="1.0" encoding="UTF-8"?>'
        '<ListeBlancheMSSante xmlns="https://listeblanche.mssante.fr/schema">'
        "<DateDeGeneration>2026-01-01T00:00:00Z</DateDeGeneration>"
        f"<ListeDomaines>{body}</ListeDomaines>" + ("</ListeBlancheMSSante>" if close_root else "")
    )
    return text.encode("utf-8")


@pytest.fixture(scope="module")
def full() -> Whitelist:
    return parse_whitelist(FULL.read_bytes())


@pytest.fixture(scope="module")
def partial() -> Whitelist:
    return parse_whitelist(PARTIAL.read_bytes())


def test_the_published_list_parses_although_its_root_is_never_closed(full: Whitelist) -> None:
    assert not FULL.read_bytes().rstrip().endswith(b"</ListeBlancheMSSante>")
    assert full.generated_at == "2025-03-13T14:54:10Z"
    # 6,554 Domaine elements, 5,002 distinct names, one of which is not a host name.
    assert len(full.domains) == 5001
    # 392 distinct DN strings, 384 distinct DNs once spacing and case are normalised.
    assert len(full.operators) == 384
    assert full.has_domain("adsea29.mssante.fr")
    assert full.allows("adsea29.mssante.fr", MIPIH)


def test_a_name_that_is_not_a_host_name_is_skipped_and_reported(full: Whitelist) -> None:
    assert len(full.skipped) == 1
    assert "sessad@ase.ditepbeziers.mssante.fr" in full.skipped[0]
    assert not full.has_domain("sessad@ase.ditepbeziers.mssante.fr")


def test_repeated_domain_elements_are_merged_into_several_operators(full: Whitelist) -> None:
    # zenidoc.mssante.fr: four Domaine elements, one operator server each.
    assert len(full.operators_for("zenidoc.mssante.fr")) == 4
    for server in ("smtp-1", "smtp-2"):
        assert full.allows(
            "zenidoc.mssante.fr",
            f"CN={server}.mssante.adista.fr,OU=332315971500305,O=ADISTA,"
            "ST=Meurthe-et-Moselle (54),C=FR",
        )


def test_several_dns_in_one_domain_element() -> None:
    listed = parse_whitelist(document(("a.mssante.fr", [MIPIH, APICRYPT])))
    assert listed.allows("a.mssante.fr", MIPIH) and listed.allows("a.mssante.fr", APICRYPT)


def test_dns_are_compared_parsed_not_as_strings(full: Whitelist) -> None:
    # Listed with ", " separators; certificates print without spaces, in any case.
    domains = [d for d, dns in full.domains.items() if any("apicrypt" in dn for dn in dns)]
    assert domains
    assert full.allows(domains[0], APICRYPT.replace(", ", ","))
    assert full.allows(domains[0], APICRYPT.upper().replace(", ", " , "))
    # A quoted value with a run of spaces (and a no-break space) equals its folded form.
    assert full.is_operator(
        "CN=scytale.curie.fr,OU=1750160012,O=CLCC INSTITUT CURIE,ST=Paris (75),C=FR"
    )
    assert full.is_operator(
        "CN=mss.ch-cadillac.fr,OU=1330781295,O=C.H. DE CADILLAC,ST=Gironde (33),C=FR"
    )


def test_l_and_st_are_different_attributes(full: Whitelist) -> None:
    # The ANS test entry is listed with L= where other entries have ST=: a certificate
    # must carry the attribute the list names.
    listed = "CN=cert-expire-audit.espacedeconfiance.mssante.fr,OU=300000000099622,O=GIP - TEST9962"
    assert full.is_operator(f"{listed},L=Paris (75),C=FR")
    assert not full.is_operator(f"{listed},ST=Paris (75),C=FR")


def test_same_cn_with_another_ou_is_not_listed(full: Whitelist) -> None:
    assert not full.allows("adsea29.mssante.fr", MIPIH.replace("318310021300028", "1750000000"))
    assert not full.is_operator(MIPIH.replace("318310021300028", "1750000000"))


def test_multi_valued_rdns_compare_in_any_order() -> None:
    listed = parse_whitelist(
        document(("b.mssante.fr", ["CN=mx.b.fr+UID=42,OU=1750000000,O=B,C=FR"]))
    )
    assert listed.allows("b.mssante.fr", "UID=42+CN=mx.b.fr, OU=1750000000, O=B, C=FR")
    assert not listed.allows("b.mssante.fr", "CN=mx.b.fr,OU=1750000000,O=B,C=FR")


def test_unicode_domains_compare_as_idna() -> None:
    listed = parse_whitelist(document(("Hôpital-Été.mssante.fr", [MIPIH])))
    assert list(listed.domains) == ["xn--hpital-t-h1ab6i.mssante.fr"]
    for spelling in (
        "hôpital-été.mssante.fr",
        "HÔPITAL-ÉTÉ.MSSANTE.FR.",
        "xn--hpital-t-h1ab6i.mssante.fr",
    ):
        assert listed.allows(spelling, MIPIH), spelling
    assert normalise_domain("UC-CMP.mssante.fr") == "uc-cmp.mssante.fr"


def test_feeding_in_pieces_gives_the_same_list(partial: Whitelist) -> None:
    data = PARTIAL.read_bytes()
    parser = WhitelistParser()
    for start in range(0, len(data), 997):
        parser.feed(data[start : start + 997])
    assert parser.close() == partial


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "not well-formed"),
        (b"this is not xml", "not well-formed"),
        (b"<html><body>502 Bad Gateway</body></html>", "expected ListeBlancheMSSante"),
        (
            document(("a.mssante.fr", [MIPIH])).replace(b"listeblanche.mssante.fr", b"evil.test"),
            "expected ListeBlancheMSSante",
        ),
        # Cut inside the domain list: the tolerated missing end tag is only the root's.
        (document(("a.mssante.fr", [MIPIH]), close_root=False)[:-40], "not well-formed"),
        (
            b'<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "aaaaaaaaaa">'
            b'<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]>'
            b'<ListeBlancheMSSante xmlns="https://listeblanche.mssante.fr/schema">&b;'
            b"</ListeBlancheMSSante>",
            "forbidden XML construct",
        ),
        (
            b'<?xml version="1.0"?><!DOCTYPE l SYSTEM "http://127.0.0.1:9/x.dtd">'
            b'<ListeBlancheMSSante xmlns="https://listeblanche.mssante.fr/schema"/>',
            "forbidden XML construct",
        ),
        (
            b'<ListeBlancheMSSante xmlns="https://listeblanche.mssante.fr/schema">'
            b"<ListeDomaines></ListeDomaines></ListeBlancheMSSante>",
            "no usable domain",
        ),
    ],
)
def test_unusable_documents_are_errors(data: bytes, message: str) -> None:
    with pytest.raises(WhitelistError, match=message):
        parse_whitelist(data)


def test_missing_root_end_tag_is_accepted_only_after_the_domain_list() -> None:
    assert parse_whitelist(document(("a.mssante.fr", [MIPIH]), close_root=False)).has_domain(
        "a.mssante.fr"
    )


def test_an_unreadable_dn_is_skipped_not_fatal() -> None:
    listed = parse_whitelist(
        document(("a.mssante.fr", [MIPIH, "CN=x,FOO=bar"]), ("b.mssante.fr", ["not a dn"]))
    )
    assert list(listed.domains) == ["a.mssante.fr"]
    assert len(listed.skipped) == 2


def test_published_checksum_matches_the_partial_list() -> None:
    digest = check_checksum(PARTIAL.read_bytes(), PARTIAL_CHECKSUM.read_bytes())
    assert digest == PARTIAL_CHECKSUM.read_text().strip()
    assert parse_checksum(f"{digest.upper()}  listeblanchemssante.xml\n") == digest


def test_checksum_mismatch_and_garbage_are_refused() -> None:
    with pytest.raises(WhitelistRefused, match="SHA-256 mismatch") as caught:
        check_checksum(FULL.read_bytes(), PARTIAL_CHECKSUM.read_bytes())
    assert caught.value.kind == "checksum"
    with pytest.raises(WhitelistRefused, match="64 hexadecimal"):
        parse_checksum("<html>404</html>")


def test_partial_list_over_the_full_one_is_refused(full: Whitelist) -> None:
    with pytest.raises(WhitelistRefused) as caught:
        accept_update(
            full,
            PARTIAL.read_bytes(),
            checksum_file=PARTIAL_CHECKSUM.read_bytes(),
            max_shrink=0.10,
        )
    assert caught.value.kind == "shrink"
    assert "5001 -> 516 domains" in caught.value.message


def test_update_rules(full: Whitelist, partial: Whitelist) -> None:
    data = PARTIAL.read_bytes()
    # The first list has nothing to shrink from; a list may grow; the fraction is a setting.
    assert accept_update(None, data, checksum_file=None, max_shrink=0.1)[0] == partial
    assert accept_update(partial, FULL.read_bytes(), checksum_file=None, max_shrink=0.1)[0] == full
    assert accept_update(full, data, checksum_file=None, max_shrink=0.95)[0] == partial
    with pytest.raises(WhitelistRefused) as caught:
        accept_update(full, b"<garbage", checksum_file=None, max_shrink=0.1)
    assert caught.value.kind == "parse"


_SAMPLE = document(("a.mssante.fr", [MIPIH]), ("b.mssante.fr", [APICRYPT, MIPIH]))


@given(st.binary(max_size=2048))
@settings(max_examples=300, deadline=None)
def test_arbitrary_bytes_are_a_whitelist_error_or_a_list(data: bytes) -> None:
    try:
        parse_whitelist(data)
    except WhitelistError:
        pass


@given(st.integers(min_value=0, max_value=len(_SAMPLE) - 1), st.binary(max_size=8))
@settings(max_examples=300, deadline=None)
def test_truncated_or_corrupted_lists_never_pass_for_complete_ones(cut: int, junk: bytes) -> None:
    """A list cut short (a failed download) is refused unless only the root end tag
    is missing, in which case it is complete; junk appended is never accepted silently."""
    data = _SAMPLE[:cut]
    try:
        listed = parse_whitelist(data + junk)
    except WhitelistError:
        return
    assert listed == parse_whitelist(_SAMPLE)
