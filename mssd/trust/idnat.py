"""National identifiers of professionals (idNat_PS) and organisations (idNat_Struct).

Only the shape is checked here: the directory (annuaire) is the authority on
whether an identifier exists. RPPS and FINESS numbers carry a Luhn key, but the
national test identities do not always honour it, so it is not enforced.
"""

from __future__ import annotations

import re


class IdNatError(ValueError):
    """An identifier that cannot be a national id; the message says why."""


# ANS, "Identifiants des acteurs de santé": idNat_PS = "8" + RPPS (11 digits),
# or "0" + ADELI (9 characters, digits with 2A/2B for Corsican departments).
_IDNAT_PS = re.compile(r"8\d{11}|0(?:\d{2}|2[AB])\d{7}")
# idNat_Struct = "1" + FINESS (9 characters, 2A/2B allowed) or "3" + SIRET (14 digits).
_IDNAT_STRUCT = re.compile(r"1(?:\d{2}|2[AB])\d{7}|3\d{14}")


_RPPS = re.compile(r"\d{11}")


def check_rpps(value: str) -> str:
    """Return ``value`` if it is shaped like an RPPS number, else raise IdNatError."""
    if not _RPPS.fullmatch(value):
        raise IdNatError(f"expected the 11-digit RPPS number, got {value!r}")
    return value


def check_idnat_ps(value: str) -> str:
    """Return ``value`` if it is shaped like an idNat_PS, else raise IdNatError."""
    if not _IDNAT_PS.fullmatch(value):
        raise IdNatError(
            f"{value!r} is not an idNat_PS: expected 8 followed by the 11-digit RPPS number, "
            "or 0 followed by the 9-character ADELI number"
        )
    return value


def check_idnat_struct(value: str) -> str:
    """Return ``value`` if it is shaped like an idNat_Struct, else raise IdNatError."""
    if not _IDNAT_STRUCT.fullmatch(value):
        raise IdNatError(
            f"{value!r} is not an idNat_Struct: expected 1 followed by the 9-character FINESS "
            "number, or 3 followed by the 14-digit SIRET number"
        )
    return value
