"""Hypothesis strategies shared by the parsers' fuzz tests."""

from __future__ import annotations

from hypothesis import strategies as st


@st.composite
def mutated(draw: st.DrawFn, examples: st.SearchStrategy[bytes]) -> bytes:
    """A valid example with one to four octet-level deletions, insertions or
    replacements: input close enough to valid to reach the parser's deep states."""
    data = bytearray(draw(examples))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.integers(0, 2))
        at = draw(st.integers(0, len(data)))
        if op == 0 and at < len(data):
            del data[at]
        elif op == 1:
            data[at:at] = draw(st.binary(min_size=1, max_size=3))
        elif at < len(data):
            data[at] = draw(st.integers(0, 255))
    return bytes(data)
