"""The wire format, pinned with fixed bytes: a change here breaks every image in the field."""

import pytest

from ttci.wire.agent_protocol import (
    MAX_PAYLOAD,
    Decoder,
    Frame,
    MsgType,
    ProtocolError,
    encode,
    encode_data,
    encode_json,
)


def test_encode_fixed_bytes() -> None:
    assert encode(MsgType.STDOUT, 7, b"hi") == (
        b"TT\x01\x06" + b"\x00\x00\x00\x07" + b"\x00\x00\x00\x02" + b"hi"
    )


def test_encode_json_is_compact_and_sorted() -> None:
    frame = encode_json(MsgType.EXEC, 1, {"stdin": False, "argv": ["uname", "-m"]})
    assert frame == (
        b"TT\x01\x03\x00\x00\x00\x01\x00\x00\x00\x25" + b'{"argv":["uname","-m"],"stdin":false}'
    )


def test_decoder_handles_split_and_joined_frames() -> None:
    stream = (
        encode(MsgType.STDOUT, 1, b"abc")
        + encode(MsgType.STDERR, 2, b"")
        + encode(MsgType.EXIT, 1, b'{"code":0}')
    )
    d = Decoder()
    got = []
    for i in range(len(stream)):  # one byte at a time
        got += d.feed(stream[i : i + 1])
    assert got == [
        Frame(MsgType.STDOUT, 1, b"abc"),
        Frame(MsgType.STDERR, 2, b""),
        Frame(MsgType.EXIT, 1, b'{"code":0}'),
    ]
    assert got[2].json() == {"code": 0}
    assert d.pending == 0


def test_large_data_is_split_into_frames() -> None:
    data = b"x" * (MAX_PAYLOAD * 2 + 5)
    frames = encode_data(MsgType.STDIN, 3, data)
    assert len(frames) == 3
    decoded = Decoder().feed(b"".join(frames))
    assert b"".join(f.payload for f in decoded) == data


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"XX\x01\x06\x00\x00\x00\x01\x00\x00\x00\x00", "bad magic"),
        (b"TT\x02\x06\x00\x00\x00\x01\x00\x00\x00\x00", "frame format 2"),
        (b"TT\x01\x63\x00\x00\x00\x01\x00\x00\x00\x00", "unknown message type 99"),
        (b"TT\x01\x06\x00\x00\x00\x01\xff\xff\xff\xff", "exceeds"),
    ],
)
def test_decoder_rejects_garbage(raw: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        Decoder().feed(raw)


def test_oversized_payload_is_refused_when_encoding() -> None:
    with pytest.raises(ProtocolError):
        encode(MsgType.STDOUT, 1, b"x" * (MAX_PAYLOAD + 1))


def test_non_object_json_is_an_error() -> None:
    with pytest.raises(ProtocolError, match="not a JSON object"):
        Frame(MsgType.EXIT, 1, b"[1]").json()
