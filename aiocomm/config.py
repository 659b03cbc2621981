"""How a process learns its place in the world: the launcher's environment.

Precedence: ``AIOCOMM_RANK`` + ``AIOCOMM_HOSTFILE``, then ``MLX_RANK`` +
``MLX_HOSTFILE`` (what ``mlx.launch --backend ring`` writes).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

from .errors import CommError

#: (rank variable, hostfile variable), in order of precedence.
ENV_SOURCES: tuple[tuple[str, str], ...] = (
    ("AIOCOMM_RANK", "AIOCOMM_HOSTFILE"),
    ("MLX_RANK", "MLX_HOSTFILE"),
)

DEFAULT_TIMEOUT = 300.0
DEFAULT_CONNECT_TIMEOUT = 60.0

Address = tuple[str, int]


@dataclass(frozen=True)
class WorldSpec:
    """Everything needed to form the world group."""

    rank: int
    addresses: tuple[tuple[Address, ...], ...]  # per rank: where it listens
    token: bytes
    source: str  # the variables it came from, for messages
    listen_fds: tuple[int, ...] = ()  # listening sockets inherited from the launcher

    @property
    def size(self) -> int:
        return len(self.addresses)


def parse_address(text: str, *, where: str) -> Address:
    """``"ip:port"`` or ``"[v6]:port"`` as ``(host, port)``."""
    if not isinstance(text, str):
        raise CommError(f"{where}: address {text!r} is not an 'ip:port' string")
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise CommError(f"{where}: address {text!r} is not 'ip:port'")
    return host, int(port)


def read_hostfile(path: str) -> tuple[tuple[Address, ...], ...]:
    """Read a hostfile: a JSON list with one list of ``"ip:port"`` per rank."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except OSError as exc:
        raise CommError(f"cannot read hostfile {path!r}: {exc}") from exc
    except ValueError as exc:
        raise CommError(f"hostfile {path!r} is not valid JSON: {exc}") from exc
    if not isinstance(data, list) or not data:
        raise CommError(f"hostfile {path!r} must be a non-empty JSON list (one entry per rank)")
    result = []
    for rank, entry in enumerate(data):
        if isinstance(entry, str):
            entry = [entry]
        if not isinstance(entry, list) or not entry:
            raise CommError(f"hostfile {path!r}: entry for rank {rank} must be a list of 'ip:port' strings")
        result.append(tuple(parse_address(a, where=f"hostfile {path!r}, rank {rank}") for a in entry))
    return tuple(result)


def token_from_env(environ: Mapping[str, str]) -> bytes:
    token = environ.get("AIOCOMM_TOKEN", "")
    return token.encode()


def spec_from_env(environ: Mapping[str, str] | None = None) -> WorldSpec | None:
    """The world this process was launched into, or ``None`` if not launched."""
    env = os.environ if environ is None else environ
    for rank_var, file_var in ENV_SOURCES:
        if rank_var in env and file_var in env:
            text = env[rank_var]
            try:
                rank = int(text)
            except ValueError:
                raise CommError(f"{rank_var}={text!r} is not an integer") from None
            addresses = read_hostfile(env[file_var])
            if not 0 <= rank < len(addresses):
                raise CommError(
                    f"{rank_var}={rank} is outside hostfile {env[file_var]!r} with {len(addresses)} ranks"
                )
            return WorldSpec(rank, addresses, token_from_env(env), f"{rank_var}/{file_var}", listen_fds(env))
        if rank_var in env or file_var in env:
            missing = file_var if rank_var in env else rank_var
            lone = rank_var if rank_var in env else file_var
            warnings.warn(f"{missing} is not set; ignoring the lone {lone}", stacklevel=1)
    return None


def listen_fds(environ: Mapping[str, str]) -> tuple[int, ...]:
    """``AIOCOMM_LISTEN_FDS``: comma-separated inherited listening socket fds."""
    text = environ.get("AIOCOMM_LISTEN_FDS", "")
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise CommError(f"AIOCOMM_LISTEN_FDS={text!r} is not a comma-separated list of fds") from None


def looked_for() -> str:
    return ", ".join(f"{r} + {f}" for r, f in ENV_SOURCES)


def float_env(name: str, default: float, environ: Mapping[str, str] | None = None) -> float:
    env = os.environ if environ is None else environ
    text = env.get(name)
    if text is None or text == "":
        return default
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{name}={text!r} is not a number of seconds") from None
    if value <= 0:
        raise ValueError(f"{name}={text!r} must be positive")
    return value


#: Default of ``AIOCOMM_BUFFER_BYTES``: what a rank may buffer for receives not yet posted.
DEFAULT_BUFFER_BYTES = 256 << 20
_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def buffer_budget(environ: Mapping[str, str] | None = None) -> int:
    """Bytes this rank buffers for messages no receive has asked for yet
    (``AIOCOMM_BUFFER_BYTES``: bytes, or with a K, M or G suffix; default
    256 MiB).  Past it, senders announce messages and wait for the receive
    (see :mod:`aiocomm.transport.flow`)."""
    env = os.environ if environ is None else environ
    text = env.get("AIOCOMM_BUFFER_BYTES", "").strip()
    if not text:
        return DEFAULT_BUFFER_BYTES
    number, suffix = (text[:-1], text[-1].upper()) if text[-1].upper() in "KMG" else (text, "")
    try:
        value = int(number) * _SUFFIXES[suffix]
    except ValueError:
        raise ValueError(f"AIOCOMM_BUFFER_BYTES={text!r} is not a byte count (e.g. 268435456 or 256M)") from None
    if value < 0:
        raise ValueError(f"AIOCOMM_BUFFER_BYTES={text!r} must not be negative")
    return value


_op_timeout: float | None = None


def op_timeout() -> float:
    """Default seconds an operation may wait for a peer (``AIOCOMM_TIMEOUT``,
    read once: it is asked on every call)."""
    global _op_timeout
    if _op_timeout is None:
        _op_timeout = float_env("AIOCOMM_TIMEOUT", DEFAULT_TIMEOUT)
    return _op_timeout


def connect_timeout() -> float:
    """Seconds to form the ring at start-up (``AIOCOMM_CONNECT_TIMEOUT``)."""
    return float_env("AIOCOMM_CONNECT_TIMEOUT", DEFAULT_CONNECT_TIMEOUT)


#: Microseconds a waiting receive keeps the loop polling before it sleeps,
#: when this rank has a CPU to itself (see :func:`poll_seconds`).
DEFAULT_POLL_US = 200.0


def poll_seconds(spec: WorldSpec, environ: Mapping[str, str] | None = None, cpus: int | None = None) -> float:
    """How long a rank polls its sockets before sleeping, while a receive waits.

    A sleeping thread is woken by an interrupt when data arrives; on virtual
    machines that costs tens of microseconds per message, more than the rest
    of a small collective.  MPI libraries poll for that reason.  aiocomm polls
    for at most this long per wait (``AIOCOMM_POLL_US``; 0 turns it off), and
    by default only when the ranks on this host do not outnumber its CPUs:
    an oversubscribed rank that polls takes the CPU its peer needs.  Ranks
    count as on this host when they listen on this rank's first address's IP.
    """
    env = os.environ if environ is None else environ
    text = env.get("AIOCOMM_POLL_US", "")
    if text != "":
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"AIOCOMM_POLL_US={text!r} is not a number of microseconds") from None
        if value < 0:
            raise ValueError(f"AIOCOMM_POLL_US={text!r} must not be negative")
        return value / 1e6
    host = spec.addresses[spec.rank][0][0]
    local = sum(1 for addrs in spec.addresses if addrs[0][0] == host)
    available = cpus if cpus is not None else (os.cpu_count() or 1)
    return DEFAULT_POLL_US / 1e6 if local <= available else 0.0
