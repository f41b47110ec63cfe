"""twinstore.bus.nats_headers: the faster header parser is nats-py's, result for result."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from nats.aio.client import Client

from twinstore.bus import nats_headers

# Header blocks as NATS sends them and as a hostile publisher could: names with whitespace of
# every kind str.isspace knows (\x1c-\x1f included), non-ASCII bytes, missing colons, empty lines.
pieces = st.sampled_from(
    [b"Nats-Msg-Id", b"A", b"", b" ", b"\t", b"\x1c", b"\x0b", b"\xc3\xa9", b"\xff", b":", b"\r\n", b"x y"]
)
blocks = st.lists(st.lists(pieces, max_size=6).map(b"".join), max_size=8).map(b"\r\n".join)


def test_installed_for_every_client() -> None:
    assert Client._parse_header_lines is nats_headers.parse
    assert nats_headers.install()


@given(blocks)
def test_parse_equals_nats_py(raw: bytes) -> None:
    assert nats_headers.parse(raw) == nats_headers.ORIGINAL(raw)


@given(st.binary(max_size=200))
def test_parse_equals_nats_py_on_any_bytes(raw: bytes) -> None:
    assert nats_headers.parse(raw) == nats_headers.ORIGINAL(raw)


def test_an_event_s_headers() -> None:
    raw = (
        b"Nats-Msg-Id: thing:a:b:12\r\nTwinstore-Partition: 3\r\nTwinstore-Position: 99\r\n"
        b"Ditto-Thing-Id: a:b\r\nBad Name: x\r\n\r\n"
    )
    assert nats_headers.parse(raw) == {
        "Nats-Msg-Id": "thing:a:b:12",
        "Twinstore-Partition": "3",
        "Twinstore-Position": "99",
        "Ditto-Thing-Id": "a:b",
    }
