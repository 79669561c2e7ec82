"""The host <-> guest agent protocol, defined once (stdlib only: the guest imports this file).

A stream of frames over a virtio-serial port. Every frame has a 12-byte header:

    magic  b"TT"   2 bytes
    version        1 byte   (PROTOCOL_VERSION)
    type           1 byte   (MsgType)
    channel        4 bytes  big-endian; 0 is the control channel, each command gets its own
    length         4 bytes  big-endian payload length, at most MAX_PAYLOAD

Control messages carry UTF-8 JSON objects; STDIN/STDOUT/STDERR/FILE_DATA carry raw bytes.
The EXIT payload is ExitStatus, which the HTTP APIs also carry as their `exit` event.

Warm start (a VM restored from a snapshot template): the restored agent still holds the
template's token. Right after HELLO (with that token) the host sends IDENTITY on a channel of
its own: the clone's clock, fresh entropy, hostname, machine-id, NIC settings and its new token.
The agent applies them, answers IDENTITY_OK and ends the session; from then on only the new
token opens one. Agents that know IDENTITY list IDENTITY_FEATURE in HELLO_OK's `features`;
the host sends IDENTITY to no other (older images simply boot cold). The frame format is
unchanged, so PROTOCOL_VERSION stays 1; IDENTITY's payload carries its own version `v`.
"""

from __future__ import annotations

import enum
import json
import struct
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the guest imports this file at boot: no typing/dataclasses at run time
    from typing import Any

__all__ = [
    "CONTROL",
    "HEADER",
    "IDENTITY_FEATURE",
    "IDENTITY_VERSION",
    "JSON_TYPES",
    "MAGIC",
    "MAX_PAYLOAD",
    "PORT_NAME",
    "PROTOCOL_VERSION",
    "Decoder",
    "ExitStatus",
    "Frame",
    "MsgType",
    "ProtocolError",
    "encode",
    "encode_data",
    "encode_json",
    "exec_payload",
    "identity_payload",
    "parse_identity",
]

PROTOCOL_VERSION = 1
MAGIC = b"TT"
HEADER = struct.Struct(">2sBBII")
MAX_PAYLOAD = 1 << 20
PORT_NAME = "org.ttci.agent.0"
CONTROL = 0
IDENTITY_VERSION = 1
IDENTITY_FEATURE = f"identity/{IDENTITY_VERSION}"


class ProtocolError(Exception):
    """The byte stream is not a valid frame sequence."""


class MsgType(enum.IntEnum):
    HELLO = 1  # host -> guest {version, token, time}
    HELLO_OK = 2  # guest -> host {version, machine, hostname, agent}
    EXEC = 3  # host -> guest {argv, env, cwd, stdin, timeout}
    STDIN = 4  # host -> guest raw bytes
    STDIN_EOF = 5  # host -> guest, empty
    STDOUT = 6  # guest -> host raw bytes
    STDERR = 7  # guest -> host raw bytes
    EXIT = 8  # guest -> host ExitStatus {code, signal, timed_out, timeout, cancelled}
    CANCEL = 9  # host -> guest {signal}
    ERROR = 10  # guest -> host {message}: the request on this channel failed
    PING = 11  # host -> guest {}
    PONG = 12  # guest -> host {}
    IDENTITY = 13  # host -> guest identity_payload(): a restored clone becomes itself
    IDENTITY_OK = 14  # guest -> host {v, hostname}: applied; the session is over


JSON_TYPES = frozenset(
    {
        MsgType.HELLO,
        MsgType.HELLO_OK,
        MsgType.EXEC,
        MsgType.EXIT,
        MsgType.CANCEL,
        MsgType.ERROR,
        MsgType.PING,
        MsgType.PONG,
        MsgType.IDENTITY,
        MsgType.IDENTITY_OK,
    }
)


class Frame:
    """One decoded frame (a plain class: dataclasses cost 0.15 s of guest boot under TCG)."""

    __slots__ = ("channel", "payload", "type")

    def __init__(self, type: MsgType, channel: int, payload: bytes = b"") -> None:
        self.type = type
        self.channel = channel
        self.payload = payload

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Frame):
            return NotImplemented
        return (self.type, self.channel, self.payload) == (other.type, other.channel, other.payload)

    def __hash__(self) -> int:
        return hash((self.type, self.channel, self.payload))

    def __repr__(self) -> str:
        return f"Frame({self.type.name}, {self.channel}, {self.payload!r})"

    def json(self) -> dict[str, Any]:
        try:
            value = json.loads(self.payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise ProtocolError(f"{self.type.name} payload is not JSON: {e}") from e
        if not isinstance(value, dict):
            raise ProtocolError(f"{self.type.name} payload is not a JSON object")
        return value


def encode(msg_type: MsgType, channel: int, payload: bytes = b"") -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ProtocolError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    if not 0 <= channel < 1 << 32:
        raise ProtocolError(f"channel {channel} out of range")
    return HEADER.pack(MAGIC, PROTOCOL_VERSION, int(msg_type), channel, len(payload)) + payload


def encode_json(msg_type: MsgType, channel: int, obj: dict[str, Any]) -> bytes:
    data = json.dumps(obj, separators=(",", ":"), sort_keys=True).encode("utf-8")
    return encode(msg_type, channel, data)


def encode_data(msg_type: MsgType, channel: int, data: bytes) -> list[bytes]:
    """Split a byte string into as many frames as needed (at least one)."""
    if not data:
        return [encode(msg_type, channel, b"")]
    return [
        encode(msg_type, channel, data[i : i + MAX_PAYLOAD])
        for i in range(0, len(data), MAX_PAYLOAD)
    ]


def exec_payload(
    argv: Any,
    *,
    env: Any = None,
    cwd: str | None = None,
    stdin: bool = False,
    timeout: float | None = None,
) -> dict[str, Any]:
    """The EXEC payload: argv, and env/cwd/timeout only when set; stdin says whether STDIN
    frames follow (then STDIN_EOF), else the command's stdin is /dev/null."""
    req: dict[str, Any] = {"argv": list(argv), "stdin": stdin}
    if env is not None:
        req["env"] = dict(env)
    if cwd is not None:
        req["cwd"] = cwd
    if timeout is not None:
        req["timeout"] = timeout
    return req


def identity_payload(
    *,
    token: str,
    hostname: str,
    machine_id: str,
    seed: str,
    time: float,
    net: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The IDENTITY payload. seed: hex of fresh host entropy; net (optional): {"mac", "ip"
    (ADDR/LEN), "gateway" (or None: no route out), "dns" (list of servers, or None: leave
    resolv.conf alone)}. parse_identity checks it the same way on the guest side."""
    req: dict[str, Any] = {
        "v": IDENTITY_VERSION,
        "token": token,
        "hostname": hostname,
        "machine_id": machine_id,
        "seed": seed,
        "time": time,
    }
    if net is not None:
        req["net"] = dict(net)
    return parse_identity(req)


def _hexstr(d: dict[str, Any], key: str, size: int | None = None) -> str:
    value = d.get(key)
    ok = isinstance(value, str) and value != "" and all(c in "0123456789abcdef" for c in value)
    if not ok or (size is not None and len(str(value)) != size):
        want = f"{size} lowercase hex digits" if size else "lowercase hex digits"
        raise ProtocolError(f"identity {key} is not {want}")  # never echo a token
    return str(value)


def parse_identity(d: dict[str, Any]) -> dict[str, Any]:
    """Check an IDENTITY payload (ProtocolError says what is wrong); returns it unchanged."""
    if d.get("v") != IDENTITY_VERSION:
        raise ProtocolError(f"identity version {d.get('v')!r} is not {IDENTITY_VERSION}")
    _hexstr(d, "token")
    _hexstr(d, "machine_id", 32)
    _hexstr(d, "seed")
    name = d.get("hostname")
    if not isinstance(name, str) or not 0 < len(name) <= 63 or name.strip("-.") != name:
        raise ProtocolError(f"identity hostname {name!r} is not a host name")
    if isinstance(d.get("time"), bool) or not isinstance(d.get("time"), int | float):
        raise ProtocolError("identity time is not a number")
    net = d.get("net")
    if net is not None:
        if not isinstance(net, dict) or not _address(net.get("mac")):
            raise ProtocolError("identity net must be an object with a mac")
        for key in ("ip", "gateway"):
            if net.get(key) is not None and not _address(net[key]):
                raise ProtocolError(f"identity net {key} {net[key]!r} is not an address")
        dns = net.get("dns")
        if dns is not None and not (isinstance(dns, list) and all(_address(x) for x in dns)):
            raise ProtocolError("identity net dns is not a list of addresses")
    return d


def _address(value: object) -> bool:
    """A MAC, an IP address or ADDR/LEN: only the characters those have (no spaces, no words:
    the guest hands them to `ip -batch`)."""
    return (
        isinstance(value, str)
        and 0 < len(value) <= 64
        and all(c in "0123456789abcdefABCDEF:./" for c in value)
    )


class Decoder:
    """Incremental decoder: feed bytes as they arrive, get whole frames back."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def reset(self) -> None:
        self._buf.clear()

    @property
    def pending(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[Frame]:
        self._buf += data
        frames: list[Frame] = []
        while len(self._buf) >= HEADER.size:
            magic, version, mtype, channel, length = HEADER.unpack_from(self._buf)
            if magic != MAGIC:
                raise ProtocolError(f"bad magic {bytes(magic)!r}")
            if version != PROTOCOL_VERSION:
                raise ProtocolError(
                    f"protocol version {version} is not {PROTOCOL_VERSION}: "
                    "rebuild the image or upgrade the host so both match"
                )
            if length > MAX_PAYLOAD:
                raise ProtocolError(f"frame of {length} bytes exceeds {MAX_PAYLOAD}")
            try:
                kind = MsgType(mtype)
            except ValueError:
                raise ProtocolError(f"unknown message type {mtype}") from None
            end = HEADER.size + length
            if len(self._buf) < end:
                break
            frames.append(Frame(kind, channel, bytes(self._buf[HEADER.size : end])))
            del self._buf[:end]
        return frames


def _int_or_none(d: dict[str, Any], key: str) -> int | None:
    value = d.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"exit status {key} {value!r} is not a whole number")
    return value


def _number_or_none(d: dict[str, Any], key: str) -> float | None:
    value = d.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ProtocolError(f"exit status {key} {value!r} is not a number")
    return value


def _flag(d: dict[str, Any], key: str) -> bool:
    value = d.get(key, False)
    if not isinstance(value, bool):
        raise ProtocolError(f"exit status {key} {value!r} is not true or false")
    return value


class ExitStatus:
    """How a command ended: the EXIT payload, and the `exit` event of the HTTP exec streams.

    A plain immutable class, not a dataclass (see Frame: the guest builds it at boot).
    code is None when a signal ended the command; timeout is the limit the command had.
    """

    __slots__ = ("cancelled", "code", "signal", "timed_out", "timeout")
    FIELDS = ("code", "signal", "timed_out", "timeout", "cancelled")

    code: int | None
    signal: int | None
    timed_out: bool
    timeout: float | None
    cancelled: bool

    def __init__(
        self,
        code: int | None = None,
        signal: int | None = None,
        timed_out: bool = False,
        timeout: float | None = None,
        cancelled: bool = False,
    ) -> None:
        for key, value in zip(
            self.FIELDS, (code, signal, timed_out, timeout, cancelled), strict=True
        ):
            object.__setattr__(self, key, value)

    def __setattr__(self, key: str, value: object) -> None:
        raise AttributeError(f"ExitStatus is immutable (tried to set {key})")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ExitStatus):
            return NotImplemented
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        return "ExitStatus(" + ", ".join(f"{k}={getattr(self, k)!r}" for k in self.FIELDS) + ")"

    def _values(self) -> tuple[object, ...]:
        return tuple(getattr(self, k) for k in self.FIELDS)

    @property
    def ok(self) -> bool:
        return self.code == 0

    def to_dict(self) -> dict[str, Any]:
        return dict(zip(self.FIELDS, self._values(), strict=True))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExitStatus:
        """Raises ProtocolError when a field has the wrong type (missing ones take defaults)."""
        return cls(
            code=_int_or_none(d, "code"),
            signal=_int_or_none(d, "signal"),
            timed_out=_flag(d, "timed_out"),
            timeout=_number_or_none(d, "timeout"),
            cancelled=_flag(d, "cancelled"),
        )

    def text(self) -> str:
        """Human words for how the command ended."""
        if self.timed_out:
            return f"timed out after {self.timeout:g} s" if self.timeout else "timed out"
        if self.cancelled:
            return "cancelled"
        if self.signal:
            return f"killed by signal {self.signal}"
        return f"exit code {self.code}"
