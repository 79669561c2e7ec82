"""tt-agent: runs inside every guest and executes what its host asks (stdlib only).

It speaks ttci.wire.agent_protocol over the virtio-serial port named PORT_NAME. The host must
say HELLO with the VM's token (from the kernel command line `tt.token=`) before anything
else is accepted. A VM restored from a snapshot template is given its own identity (and a new
token, which replaces the kernel command line's) by IDENTITY; see apply_identity.
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
from ttci.wire.agent_protocol import (
    CONTROL,
    IDENTITY_FEATURE,
    IDENTITY_VERSION,
    PORT_NAME,
    PROTOCOL_VERSION,
    Decoder,
    ExitStatus,
    Frame,
    MsgType,
    ProtocolError,
    encode_data,
    encode_json,
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

READ_SIZE = 1 << 16
PIPE_SIZE = 1 << 20  # bigger pipes mean fewer, larger frames: throughput under TCG
F_SETPIPE_SZ = 1031
KILL_GRACE_S = 2.0
OUTPUT_GRACE_S = 2.0


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


class Link:
    """The port: one writer lock, whole frames only."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.lock = threading.Lock()

    def send(self, data: bytes) -> None:
        with self.lock:
            view = memoryview(data)
            while view:
                try:
                    n = os.write(self.fd, view)
                except BlockingIOError:
                    time.sleep(0.005)
                    continue
                view = view[n:]

    def send_json(self, mtype: MsgType, channel: int, obj: dict[str, Any]) -> None:
        self.send(encode_json(mtype, channel, obj))


class Process:
    """One command in the guest (an EXEC): its process group, output pumps and exit report."""

    def __init__(self, link: Link, channel: int, req: dict[str, Any]) -> None:
        self.link = link
        self.channel = channel
        self.cancelled = False
        self.timed_out = False
        argv = req.get("argv")
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise ValueError("argv must be a non-empty list of strings")
        env = req.get("env")
        if env is None:
            env = dict(os.environ)
        elif not isinstance(env, dict):
            raise ValueError("env must be an object of strings")
        timeout = req.get("timeout")
        if timeout is not None and (not isinstance(timeout, int | float) or timeout <= 0):
            raise ValueError("timeout must be a positive number of seconds")
        self.timeout = timeout
        self.finished = False
        self.stdin_queue: list[bytes | None] = []
        self.stdin_ready = threading.Condition()
        self.proc = subprocess.Popen(
            argv,
            env={str(k): str(v) for k, v in env.items()},
            cwd=req.get("cwd") or "/",
            stdin=subprocess.PIPE if req.get("stdin") else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self.pumps = [
            threading.Thread(
                target=self._pump, args=(self.proc.stdout, MsgType.STDOUT), daemon=True
            ),
            threading.Thread(
                target=self._pump, args=(self.proc.stderr, MsgType.STDERR), daemon=True
            ),
        ]
        for t in self.pumps:
            t.start()
        if self.proc.stdin is not None:
            threading.Thread(target=self._feed_stdin, daemon=True).start()
        threading.Thread(target=self._wait, daemon=True).start()

    def _pump(self, pipe: Any, mtype: MsgType) -> None:
        fd = pipe.fileno()
        try:
            import fcntl  # noqa: PLC0415 - only needed once a command runs, not at boot

            fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_SIZE)
            size = PIPE_SIZE
        except OSError:
            size = READ_SIZE
        while True:
            data = os.read(fd, size)
            if not data:
                break
            for frame in encode_data(mtype, self.channel, data):
                self.link.send(frame)
        pipe.close()

    def _wait(self) -> None:
        status = ExitStatus(timeout=self.timeout)
        try:
            try:
                self.proc.wait(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                self.timed_out = True
                self.kill(signal.SIGTERM)
                self.proc.wait()
            # A background child (`server &`) may keep stdout open: the command is over when
            # its leader exits, so wait only a moment for the rest of the output.
            for t in self.pumps:
                t.join(timeout=OUTPUT_GRACE_S)
            rc = self.proc.returncode
            status = ExitStatus(
                code=rc if rc >= 0 else None,
                signal=-rc if rc < 0 else None,
                timed_out=self.timed_out,
                timeout=self.timeout,
                cancelled=self.cancelled,
            )
        finally:
            self.finished = True
            self.link.send_json(MsgType.EXIT, self.channel, status.to_dict())

    def kill(self, sig: int) -> None:
        """Signal the whole process group, then SIGKILL it if it lingers."""
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            return
        if sig != signal.SIGKILL:
            threading.Timer(KILL_GRACE_S, self._force_kill).start()

    def _force_kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def write_stdin(self, data: bytes | None) -> None:
        """Queue stdin (None: end of input); a thread feeds it, so a command that does not
        read its stdin never blocks the agent's read loop."""
        with self.stdin_ready:
            self.stdin_queue.append(data)
            self.stdin_ready.notify()

    def close_stdin(self) -> None:
        self.write_stdin(None)

    def _feed_stdin(self) -> None:
        pipe = self.proc.stdin
        while pipe is not None:
            with self.stdin_ready:
                while not self.stdin_queue:
                    self.stdin_ready.wait()
                data = self.stdin_queue.pop(0)
            try:
                if data is None:
                    pipe.close()
                    return
                pipe.write(data)
                pipe.flush()
            except (BrokenPipeError, ValueError, OSError):
                try:
                    pipe.close()
                except OSError:
                    pass
                return


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
                proc.cancelled = True
                proc.kill(int(frame.json().get("signal") or signal.SIGTERM))
        else:
            self.link.send_json(
                MsgType.ERROR, frame.channel, {"message": f"unexpected {frame.type.name}"}
            )

    def _hello(self, frame: Frame) -> None:
        req = frame.json()
        given = str(req.get("token") or "")
        if self.token and not same_secret(given, self.token):
            self.authed = False
            self.link.send_json(MsgType.ERROR, frame.channel, {"message": "bad token"})
            return
        if req.get("version") != PROTOCOL_VERSION:
            self.link.send_json(
                MsgType.ERROR,
                frame.channel,
                {"message": f"agent speaks protocol {PROTOCOL_VERSION}, not {req.get('version')}"},
            )
            return
        host_time = req.get("time")
        if isinstance(host_time, int | float) and abs(time.time() - host_time) > 2:
            # After a snapshot restore or with no RTC the guest clock is behind.
            try:
                time.clock_settime(time.CLOCK_REALTIME, float(host_time))
            except OSError:
                pass
        for proc in self.procs.values():  # a new session: nobody reads the old ones any more
            proc.kill(signal.SIGKILL)
        self.procs.clear()
        self.authed = True
        self.link.send_json(
            MsgType.HELLO_OK,
            frame.channel,
            {
                "version": PROTOCOL_VERSION,
                "agent": __version__,
                "machine": os.uname().machine,
                "hostname": os.uname().nodename,
                "nonce": req.get("nonce"),
                "features": [IDENTITY_FEATURE],
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
    """Serve the protocol on fd until stop is set (never, in a guest)."""
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
            agent.handle(frame)
        agent.reap_finished()


def main() -> int:
    token = kernel_param("tt.token")
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
