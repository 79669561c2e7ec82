"""TLS shared by servers and clients: the certificate and key a daemon serves with (checked at
start), the scheme an address means, and how a client verifies a server against a CA.

An address with `https://` or `http://` means that scheme; a bare ADDR:PORT means https when a
CA is configured (configuring a CA never silently falls back to plain HTTP) and http otherwise
(loopback, the all-in-one cloud). Standard library only: the GitLab driver's stream imports it.
"""

from __future__ import annotations

import os
import re
import ssl
import stat
from dataclasses import dataclass
from pathlib import Path

from ttci.model.errors import BadInput, TTError

__all__ = [
    "CA_HINT",
    "TLSFiles",
    "base_url",
    "check_ca",
    "client_context",
    "server_context",
    "tls_error",
    "tls_files",
]

CA_HINT = "give the CA that signed its certificate: TT_CA_FILE=PATH (or `tt config --ca PATH`)"


@dataclass(frozen=True)
class TLSFiles:
    """A daemon's certificate (PEM, may carry the chain) and its private key (PEM)."""

    cert: Path
    key: Path


def _mode(path: Path, flag: str) -> int:
    try:
        st = path.stat()
    except OSError as e:
        raise BadInput(
            f"{flag} {path}: {e.strerror}", hint="check the path and its permissions"
        ) from None
    if not stat.S_ISREG(st.st_mode):
        raise BadInput(f"{flag} {path} is not a file", hint="give a PEM file")
    return stat.S_IMODE(st.st_mode)


def tls_files(
    cert: Path | None, key: Path | None, flags: tuple[str, str] = ("--tls-cert", "--tls-key")
) -> TLSFiles | None:
    """The daemon's --tls-cert/--tls-key, checked: both or neither; the key readable by this
    user and by no other (group is allowed: e.g. Debian's ssl-cert); the pair loads."""
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        given, missing = (flags[0], flags[1]) if cert is not None else (flags[1], flags[0])
        raise BadInput(f"{given} needs {missing}", hint="give both, or neither for plain HTTP")
    _mode(cert, flags[0])
    mode = _mode(key, flags[1])
    if mode & (stat.S_IROTH | stat.S_IWOTH):
        raise BadInput(
            f"{flags[1]} {key} is open to every user on this machine (mode {mode:04o})",
            hint=f"chmod 600 {key} (or 640 with a group this daemon runs in)",
        )
    if not os.access(key, os.R_OK):
        raise BadInput(f"{flags[1]} {key} is not readable by this user", hint="check its owner")
    files = TLSFiles(cert, key)
    server_context(files)  # a bad pair fails here, before anything starts
    return files


def server_context(files: TLSFiles) -> ssl.SSLContext:
    """A server context (TLS 1.2 or later) holding the certificate and key; BadInput if they
    do not load. The error names the files, never their contents."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(files.cert), str(files.key))
    except (ssl.SSLError, OSError) as e:
        raise BadInput(
            f"cannot load the TLS certificate {files.cert} with the key {files.key}: "
            f"{getattr(e, 'reason', None) or e.strerror or e}",
            hint="give the PEM certificate and its matching unencrypted PEM key",
        ) from None
    return ctx


def check_ca(ca: Path, where: str = "the CA file") -> Path:
    """A readable PEM file with at least one certificate, or BadInput naming `where`."""
    try:
        ssl.create_default_context(cafile=str(ca))
    except FileNotFoundError:
        raise BadInput(f"{where} {ca} does not exist", hint="give the CA's PEM file") from None
    except (ssl.SSLError, OSError) as e:
        raise BadInput(
            f"{where} {ca} holds no usable CA certificate: {e}",
            hint="give the PEM file of the CA that signed the server's certificate",
        ) from None
    return ca


def base_url(addr: str, ca: Path | None) -> str:
    """The base URL of a server given as `https://…`, `http://…` or a bare ADDR:PORT."""
    addr = addr.strip().rstrip("/")
    if addr.startswith(("http://", "https://")):
        return addr
    return f"{'https' if ca else 'http'}://{addr}"


def client_context(ca: Path | None) -> ssl.SSLContext:
    """What an https client verifies with: the CA file, else the system's trust store."""
    return ssl.create_default_context(cafile=str(ca) if ca else None)


def _ssl_error(e: BaseException | None, depth: int = 0) -> ssl.SSLError | None:
    """The ssl error inside an exception from requests/urllib3/http.client, if any."""
    if e is None or depth > 8:
        return None
    if isinstance(e, ssl.SSLError):
        return e
    inner = [getattr(e, "reason", None), e.__cause__, e.__context__]
    inner += [a for a in getattr(e, "args", ()) if isinstance(a, BaseException)]
    for x in inner:
        if isinstance(x, BaseException) and (found := _ssl_error(x, depth + 1)):
            return found
    return None


def tls_error(e: BaseException, what: str, ca: Path | None) -> TTError | None:
    """A clear TTError when `e` is a TLS failure talking to `what` (e.g. "the scheduler at
    X"), else None: an untrusted certificate, a name mismatch, a server without TLS."""
    err = _ssl_error(e)
    if err is None:
        return None
    trusted = f"the CA {ca}" if ca else "the system's trust store (no CA configured)"
    if isinstance(err, ssl.SSLCertVerificationError):
        return TTError(
            f"{what} presented a TLS certificate that {trusted} does not verify: "
            f"{err.verify_message}",
            hint=CA_HINT if ca is None else "give the CA that signed the server's certificate",
        )
    reason = err.reason or str(err)
    if reason == "WRONG_VERSION_NUMBER" or re.search(r"wrong.version", reason, re.I):
        return TTError(
            f"{what} does not speak TLS (the handshake failed: {reason})",
            hint="write its address as http://ADDR:PORT, or turn on its --tls-cert/--tls-key",
        )
    return TTError(f"the TLS handshake with {what} failed: {reason}")
