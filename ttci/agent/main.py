"""tt-agent: runs inside every guest and executes what its host asks (stdlib only).

It speaks ttci.wire.agent_protocol over the virtio-serial port named PORT_NAME. The host must
say HELLO with the VM's token before anything else is accepted. The token is not on the kernel
command line (QEMU's would show it to every user of the host): the first HELLO after boot
brings it (trust on first use: only root on the host reaches the port), and from then on only
that token opens a session. A VM restored from a snapshot template is given its own identity
(and a new token) by IDENTITY; see apply_identity. A malformed frame from the host is refused
with an ERROR on its channel; the agent keeps serving.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imports are kept few: each costs tens of ms at boot under TCG
    from typing import Any

from ttci import __version__
from ttci.agent.process import (
    F_SETPIPE_SZ,
    KILL_GRACE_S,
    OUTPUT_GRACE_S,
    PIPE_SIZE,
    READ_SIZE,
    Link,
    Process,
)
from ttci.wire.agent_protocol import (
    CONTROL,
    IDENTITY_FEATURE,
    IDENTITY_VERSION,
    PORT_NAME,
    PROTOCOL_VERSION,
    Decoder,
    Frame,
    MsgType,
    ProtocolError,
    encode_json,
    negotiate,
    parse_identity,
)

__all__ = [
    "F_SETPIPE_SZ",
    "KILL_GRACE_S",
    "OUTPUT_GRACE_S",
    "PIPE_SIZE",
    "READ_SIZE",
    "Agent",
    "Link",
    "Process",
    "apply_identity",
    "find_port",
    "kernel_param",
    "main",
    "same_secret",
    "serve",
    "serve_fd",
]


def find_port(name: str = PORT_NAME, sys_dir: str = "/sys/class/virtio-ports") -> str | None:
    """Find our port's /dev node by its name: device numbers differ between machines."""
    try:
        entries = os.listdir(sys_dir)
    except FileNotFoundError:
        return None
    for entry in sorted(entries):
        try:
            with open(os.path.join(sys_dir, entry, "name")) as f:
                if f.read().strip() == name:
                    return os.path.join("/dev", entry)
        except OSError:
            continue
    return None


def kernel_param(key: str, cmdline_path: str = "/proc/cmdline") -> str | None:
    try:
        with open(cmdline_path) as f:
            words = f.read().split()
    except OSError:
        return None
    for word in words:
        if word.startswith(key + "="):
            return word[len(key) + 1 :]
    return None


def same_secret(a: str, b: str) -> bool:
    """Constant-time comparison (hmac.compare_digest would pull in hashlib at boot)."""
    x, y = a.encode(), b.encode()
    diff = len(x) ^ len(y)
    for i in range(max(len(x), len(y))):
        diff |= (x[i] if i < len(x) else 0) ^ (y[i] if i < len(y) else 0)
    return diff == 0


def _ioctl_numbers() -> tuple[int, int]:
    """RNDADDENTROPY and RNDRESEEDCRNG: powerpc, mips and sparc encode ioctl directions
    differently from every other Linux architecture."""
    odd = os.uname().machine.startswith(("ppc", "mips", "sparc"))
    write, none = (0x80000000, 0x20000000) if odd else (0x40000000, 0)
    return write | (8 << 16) | 0x5203, none | 0x5207


def _reseed(seed: bytes) -> str:
    """Mix host entropy into the kernel RNG, credit it and force a reseed (root only)."""
    import fcntl  # noqa: PLC0415 - only a restored clone needs these
    import struct  # noqa: PLC0415

    add, reseed = _ioctl_numbers()
    try:
        with open("/dev/urandom", "wb") as f:
            fcntl.ioctl(f.fileno(), add, struct.pack("ii", len(seed) * 8, len(seed)) + seed)
            fcntl.ioctl(f.fileno(), reseed)  # Linux 4.17+: the crng uses it from now on
        return "credited"
    except OSError:
        with open("/dev/urandom", "wb") as f:  # not credited, but mixed in all the same
            f.write(seed)
        return "mixed"


def _write(path: str, text: str) -> None:
    tmp = path + ".tt-new"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


_ip_helper: list[subprocess.Popen[str]] = []  # a template's `ip -batch -`, started at boot


def _ip_batch(script: str) -> None:
    """Run ip commands: in a clone, through the ip its template started (exec costs ~0.1 s)."""
    proc = _ip_helper.pop() if _ip_helper else None
    if proc is None or proc.poll() is not None:
        proc = _start_ip()
    _, err = proc.communicate(script, timeout=30)
    if proc.returncode != 0:
        raise OSError(f"ip: {err.strip() or proc.returncode}")


def _start_ip() -> subprocess.Popen[str]:
    p = subprocess.PIPE
    return subprocess.Popen(["ip", "-batch", "-"], stdin=p, stdout=p, stderr=p, text=True)


def _net(net: dict[str, Any]) -> None:
    """Address the NIC the clone's way (eth0: net.ifnames=0 on every image)."""
    dev = "eth0"
    lines = [
        f"link set dev {dev} down",
        f"addr flush dev {dev}",
        f"link set dev {dev} address {net['mac']}",
        *([f"addr add {net['ip']} dev {dev}"] if net.get("ip") else []),
        f"link set dev {dev} up",
        *([f"route replace default via {net['gateway']} dev {dev}"] if net.get("gateway") else []),
    ]
    _ip_batch("".join(line + "\n" for line in lines))  # parse_identity allowed no spaces
    if net.get("dns") is not None:  # written as the initrd writes it on a cold boot
        servers = "".join(f"nameserver {s}\n" for s in net["dns"])
        head = "# tt: the DNS forwarder of the ENV of this VM (given at its warm start)\n"
        _write("/etc/resolv.conf", f"{head}{servers}options timeout:2 attempts:2\n")


def apply_identity(req: dict[str, Any]) -> dict[str, Any]:
    """Make a restored clone itself: clock, RNG, hostname, machine-id, NIC (OSError on failure).

    The order matters: the clock and the RNG first, so nothing after runs on the template's.
    The answer says how long each step took (ms), for the host's log."""
    t0 = time.monotonic()
    time.clock_settime(time.CLOCK_REALTIME, float(req["time"]))
    rng = _reseed(bytes.fromhex(req["seed"]))
    t1 = time.monotonic()
    with open("/proc/sys/kernel/hostname", "w") as f:  # sethostname without importing socket
        f.write(req["hostname"])
    _write("/etc/hostname", req["hostname"] + "\n")
    _write("/etc/machine-id", req["machine_id"] + "\n")
    t2 = time.monotonic()
    if req.get("net") is not None:
        _net(req["net"])
    took = {"clock_rng": t1 - t0, "names": t2 - t1, "net": time.monotonic() - t2}
    return {
        "v": IDENTITY_VERSION,
        "hostname": os.uname().nodename,
        "rng": rng,
        "took_ms": {k: round(v * 1000) for k, v in took.items()},
    }


class Agent:
    def __init__(self, link: Link, token: str | None) -> None:
        self.link = link
        self.token = token
        self.authed = False
        self.procs: dict[int, Process] = {}

    def handle(self, frame: Frame) -> None:
        if frame.type is MsgType.HELLO:
            self._hello(frame)
            return
        if not self.authed:
            self.link.send_json(MsgType.ERROR, frame.channel, {"message": "say HELLO first"})
            return
        if frame.type is MsgType.PING:
            self.link.send_json(MsgType.PONG, frame.channel, {})
        elif frame.type is MsgType.EXEC:
            self._exec(frame)
        elif frame.type is MsgType.IDENTITY:
            self._identity(frame)
        elif frame.type in (MsgType.STDIN, MsgType.STDIN_EOF, MsgType.CANCEL):
            proc = self.procs.get(frame.channel)
            if proc is None:
                return
            if frame.type is MsgType.STDIN:
                proc.write_stdin(frame.payload)
            elif frame.type is MsgType.STDIN_EOF:
                proc.close_stdin()
            else:
                sig = frame.json().get("signal") or signal.SIGTERM
                if isinstance(sig, bool) or not isinstance(sig, int) or not 0 < sig < 65:
                    raise ValueError(f"CANCEL signal {str(sig)[:40]!r} is not a signal number")
                proc.cancelled = True
                proc.kill(sig)
        else:
            raise ValueError(f"unexpected {frame.type.name}")

    def _hello(self, frame: Frame) -> None:
        req = frame.json()
        given = str(req.get("token") or "")
        if self.token and not same_secret(given, self.token):
            self.authed = False
            raise ValueError("bad token")
        version = negotiate(req)  # the highest protocol both speak (a 0.1 host: 1)
        if version is None:
            raise ValueError(f"agent speaks protocol {PROTOCOL_VERSION}, not {req.get('version')}")
        provisioned = not self.token and bool(given)  # trust on first use, once per boot
        self.token = self.token or given or None
        host_time = req.get("time")
        if isinstance(host_time, int | float) and abs(time.time() - host_time) > 2:
            # After a snapshot restore or with no RTC the guest clock is behind.
            try:
                time.clock_settime(time.CLOCK_REALTIME, float(host_time))
            except (OSError, ValueError, OverflowError):
                pass
        for proc in self.procs.values():  # a new session: nobody reads the old ones any more
            proc.kill(signal.SIGKILL)
        self.procs.clear()
        self.authed = True
        self.link.send_json(
            MsgType.HELLO_OK,
            frame.channel,
            {
                "version": version,
                "agent": __version__,
                "machine": os.uname().machine,
                "hostname": os.uname().nodename,
                "nonce": req.get("nonce"),
                "features": [IDENTITY_FEATURE],
                "provisioned": provisioned,
            },
        )

    def _identity(self, frame: Frame) -> None:
        """Become a new VM (after a snapshot restore); the old token opens nothing after this."""
        try:
            req = parse_identity(frame.json())
            done = apply_identity(req)
        except (OSError, ValueError, ProtocolError) as e:
            self.link.send_json(MsgType.ERROR, frame.channel, {"message": f"identity: {e}"})
            return
        self.token = req["token"]
        self.authed = False
        self.link.send_json(MsgType.IDENTITY_OK, frame.channel, done)

    def _exec(self, frame: Frame) -> None:
        if frame.channel == CONTROL or frame.channel in self.procs:
            self.link.send_json(MsgType.ERROR, frame.channel, {"message": "channel in use"})
            return
        try:
            self.procs[frame.channel] = Process(self.link, frame.channel, frame.json())
        except (OSError, ValueError, TypeError, ProtocolError) as e:
            self.link.send_json(MsgType.ERROR, frame.channel, {"message": str(e)})

    def reap_finished(self) -> None:
        for ch in [c for c, p in self.procs.items() if p.finished]:
            del self.procs[ch]


def serve(path: str, token: str | None) -> None:
    serve_fd(os.open(path, os.O_RDWR | os.O_CLOEXEC), token)


def serve_fd(fd: int, token: str | None, stop: threading.Event | None = None) -> None:
    """Serve the protocol on fd until stop is set (never, in a guest). token None: the first
    HELLO that brings one sets it."""
    link = Link(fd)
    agent = Agent(link, token)
    decoder = Decoder()
    while stop is None or not stop.is_set():
        data = os.read(fd, READ_SIZE)
        if not data:  # no host connected: the port reads EOF until one is
            decoder.reset()
            agent.authed = False
            time.sleep(0.02)
            continue
        try:
            frames = decoder.feed(data)
        except ProtocolError as e:
            decoder.reset()
            link.send(encode_json(MsgType.ERROR, CONTROL, {"message": f"protocol: {e}"}))
            continue
        for frame in frames:
            try:  # whatever one frame holds, the agent keeps serving
                agent.handle(frame)
            except Exception as e:  # refused, and said so on its channel
                link.send_json(MsgType.ERROR, frame.channel, {"message": str(e)[:500]})
        agent.reap_finished()


def main() -> int:
    token = kernel_param("tt.token")  # images booted by older hosts; new ones provision by HELLO
    deadline = time.monotonic() + 60
    path = find_port()
    while path is None or not os.path.exists(path):
        if time.monotonic() > deadline:
            print(f"tt-agent: no virtio port named {PORT_NAME}", file=sys.stderr)
            return 1
        time.sleep(0.01)
        path = find_port()
    try:
        with open("/proc/uptime") as f:
            up = f.read().split()[0]
    except OSError:
        up = "?"
    print(f"tt-agent {__version__}: serving on {path} at {up} s", file=sys.stderr, flush=True)
    if kernel_param("tt.template") == "1":  # a template: its clones will need ip at once
        _ip_helper.append(_start_ip())
    serve(path, token)
    return 0


if __name__ == "__main__":
    sys.exit(main())
