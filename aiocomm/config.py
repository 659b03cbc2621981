"""How a process learns its place in the world: the launcher's environment.

Precedence: ``AIOCOMM_RANK`` + ``AIOCOMM_HOSTFILE``, then ``MLX_RANK`` +
``MLX_HOSTFILE`` (what ``mlx.launch --backend ring`` writes).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import socket
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


# ---- sizes and times: one parser for every AIOCOMM_*_BYTES and every time variable
#
# A size is bytes, or a number with a K, M, G or T suffix (powers of 1024;
# an optional B or iB after it): 65536, 64K, 64KiB, 1.5M.  A time is a
# number in the variable's own unit, or a number with a unit: ns, us, ms,
# s, m (or min), h: 300, 300s, 5m, 0.2ms.  Every error names the variable and
# the value.

_BYTE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"([+-]?(?:\d+\.?\d*|\.\d+))\s*([KMGT]?)(?:I?B)?", re.IGNORECASE)
#: time units as (multiplier, divisor) to seconds, so that bare microseconds divide exactly
_TIME_UNITS: dict[str, tuple[float, float]] = {
    "ns": (1, 1e9), "us": (1, 1e6), "µs": (1, 1e6), "ms": (1, 1e3), "s": (1, 1),
    "m": (60, 1), "min": (60, 1), "h": (3600, 1),
}
_TIME = re.compile(r"([+-]?(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?|[+-]?inf(?:inity)?)\s*([a-zµ]*)", re.IGNORECASE)


def size_env(name: str, default: int, environ: Mapping[str, str] | None = None, *, minimum: int = 0) -> int:
    """The byte count in variable ``name`` (``default`` when unset or empty);
    ``ValueError`` naming the variable and its value if it is not one, or
    below ``minimum``."""
    env = os.environ if environ is None else environ
    text = env.get(name, "")
    if not text.strip():
        return default
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise ValueError(
            f"{name}={text!r} is not a byte count: give bytes, or a number with a K, M, G or T suffix "
            "(e.g. 65536, 64K, 1.5M)"
        )
    number, suffix = match.groups()
    scaled = float(number) * _BYTE_UNITS[suffix.upper()]
    if scaled != int(scaled):
        raise ValueError(f"{name}={text!r} is not a whole number of bytes ({scaled} bytes)")
    value = int(scaled)
    if value < minimum:
        raise ValueError(f"{name}={text!r} must not be negative" if minimum == 0
                         else f"{name}={text!r} must be at least {minimum} bytes")
    return value


def time_env(name: str, default: float, environ: Mapping[str, str] | None = None, *, unit: str = "s",
             positive: bool = True, finite: bool = False) -> float:
    """The time in variable ``name`` in seconds (``default``, in seconds, when
    unset or empty).  A bare number is in ``unit``.  ``positive``: it must be
    above zero, else at least zero; ``finite``: ``inf`` is refused.
    ``ValueError`` naming the variable and its value otherwise."""
    env = os.environ if environ is None else environ
    text = env.get(name, "")
    if not text.strip():
        return default
    bare = {"s": "seconds", "us": "microseconds", "ms": "milliseconds"}.get(unit, unit)
    match = _TIME.fullmatch(text.strip())
    suffix = match.group(2).lower() if match is not None else ""
    if match is None or (suffix and suffix not in _TIME_UNITS):
        raise ValueError(
            f"{name}={text!r} is not a time: give {bare} (a bare number), or a number with a unit "
            "ns, us, ms, s, m or h (e.g. " + ("200, 200us, 0.5ms" if unit == "us" else "30, 90s, 2m") + ")"
        )
    mul, div = _TIME_UNITS[suffix or unit]
    value = float(match.group(1)) * mul / div
    if positive and not value > 0:
        raise ValueError(f"{name}={text!r} must be positive")
    if not value >= 0:
        raise ValueError(f"{name}={text!r} must not be negative")
    if finite and math.isinf(value):
        raise ValueError(f"{name}={text!r} must be finite")
    return value


#: Default of ``AIOCOMM_BUFFER_BYTES``: what a rank may buffer for receives not yet posted.
DEFAULT_BUFFER_BYTES = 256 << 20


def buffer_budget(environ: Mapping[str, str] | None = None) -> int:
    """Bytes this rank buffers for messages no receive has asked for yet
    (``AIOCOMM_BUFFER_BYTES``: a size, see :func:`size_env`; default
    256 MiB).  Past it, senders announce messages and wait for the receive
    (see :mod:`aiocomm.transport.flow`)."""
    return size_env("AIOCOMM_BUFFER_BYTES", DEFAULT_BUFFER_BYTES, environ)


TRANSPORTS = ("auto", "tcp")


def transport(environ: Mapping[str, str] | None = None) -> str:
    """``AIOCOMM_TRANSPORT``: ``auto`` (default: shared memory among ranks of
    one host, TCP between hosts) or ``tcp`` (TCP everywhere)."""
    env = os.environ if environ is None else environ
    value = env.get("AIOCOMM_TRANSPORT", "").strip().lower() or "auto"
    if value not in TRANSPORTS:
        raise ValueError(f"AIOCOMM_TRANSPORT={env['AIOCOMM_TRANSPORT']!r}: expected one of {', '.join(TRANSPORTS)}")
    return value


def two_level(environ: Mapping[str, str] | None = None) -> bool:
    """``AIOCOMM_TWO_LEVEL``: ``1`` (default): a group that spans hosts with
    several ranks on some of them reduces inside each host first
    (:mod:`aiocomm.hierarchy`); ``0``: one flat ring."""
    env = os.environ if environ is None else environ
    value = env.get("AIOCOMM_TWO_LEVEL", "").strip() or "1"
    if value not in ("0", "1"):
        raise ValueError(f"AIOCOMM_TWO_LEVEL={env['AIOCOMM_TWO_LEVEL']!r}: expected 1 (two levels) or 0 (a flat ring)")
    return value == "1"


def shm_slot_bytes(environ: Mapping[str, str] | None = None) -> int:
    """Bytes of each shared-memory slot (``AIOCOMM_SHM_SLOT_BYTES``, default
    8 MiB): a collective moves its array in rounds of one slot; each rank of
    a group maps two slots of every member."""
    return size_env("AIOCOMM_SHM_SLOT_BYTES", 8 << 20, environ, minimum=4096)


_op_timeout: float | None = None


def op_timeout() -> float:
    """Default seconds an operation may wait for a peer (``AIOCOMM_TIMEOUT``,
    read once: it is asked on every call)."""
    global _op_timeout
    if _op_timeout is None:
        _op_timeout = time_env("AIOCOMM_TIMEOUT", DEFAULT_TIMEOUT)
    return _op_timeout


def connect_timeout() -> float:
    """Seconds to form the ring at start-up (``AIOCOMM_CONNECT_TIMEOUT``)."""
    return time_env("AIOCOMM_CONNECT_TIMEOUT", DEFAULT_CONNECT_TIMEOUT)


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
    polled = time_env("AIOCOMM_POLL_US", -1.0, environ, unit="us", positive=False, finite=True)
    if polled >= 0:
        return polled
    host = spec.addresses[spec.rank][0][0]
    local = sum(1 for addrs in spec.addresses if addrs[0][0] == host)
    available = cpus if cpus is not None else (os.cpu_count() or 1)
    return DEFAULT_POLL_US / 1e6 if local <= available else 0.0


# --- Slurm ----------------------------------------------------------------------
#
# srun gives each task SLURM_PROCID and SLURM_NTASKS but no address for rank 0.
# Slurm does say where the step runs: task 0 is on the first node of the
# step's node list (block and cyclic distributions both start there).

#: Where a step's (or, outside srun, the job's) nodes are listed; first set wins.
SLURM_NODELIST_VARS: tuple[str, ...] = ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
#: Ports derived from the job and step ids lie in [BASE, BASE + SPAN): below
#: Linux's ephemeral range (32768 up), where outgoing connections take theirs.
SLURM_PORT_BASE = 15000
SLURM_PORT_SPAN = 15000
#: Consecutive job ids are this many ports apart, so a job's steps 0..63 never
#: meet the next job's; within one job, any two steps less than SPAN apart differ.
SLURM_STEPS_PER_JOB = 64

_RANGE = re.compile(r"(\d+)(?:-(\d+))?")


class HostlistError(ValueError):
    """A Slurm host list that cannot be read."""


def _split_hostlist(text: str) -> list[str]:
    """Split at commas and white space outside brackets."""
    tokens: list[str] = []
    current: list[str] = []
    depth = 0
    for ch in text:
        if ch == "[":
            depth += 1
            if depth > 1:
                raise HostlistError(f"host list {text!r}: '[' inside brackets")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise HostlistError(f"host list {text!r}: ']' without '['")
        if depth == 0 and (ch == "," or ch.isspace()):
            if current:
                tokens.append("".join(current))
                current = []
            continue
        current.append(ch)
    if depth:
        raise HostlistError(f"host list {text!r}: '[' without ']'")
    if current:
        tokens.append("".join(current))
    return tokens


def _bracket_values(body: str, token: str) -> list[str]:
    """``01-04,07`` as ``["01", "02", "03", "04", "07"]``: each number is as
    wide as the low end of its range is written (Slurm's zero padding)."""
    values: list[str] = []
    for item in body.split(","):
        m = _RANGE.fullmatch(item)
        if m is None:
            raise HostlistError(f"host {token!r}: {item!r} is not a number or a range 'lo-hi'")
        lo_text, hi_text = m.group(1), m.group(2)
        lo = int(lo_text)
        hi = lo if hi_text is None else int(hi_text)
        if hi < lo:
            raise HostlistError(f"host {token!r}: range {item!r} runs backwards")
        width = len(lo_text)
        values.extend(f"{n:0{width}d}" for n in range(lo, hi + 1))
    return values


def _expand_host(token: str) -> list[str]:
    # pieces: literal, bracket body, literal, bracket body, ..., literal
    pieces = re.split(r"\[([^\]]*)\]", token)
    literals, bodies = pieces[0::2], pieces[1::2]
    if any("]" in literal for literal in literals):
        raise HostlistError(f"host {token!r}: ']' without '['")
    groups = [_bracket_values(body, token) for body in bodies]
    if not groups:
        return [token]
    # scontrol's order: the last group varies fastest; the others are taken
    # from the next-to-last (slowest) back to the first, as Slurm's expansion
    # recurses from the last '[' leftwards: a[1-2]b[3-4]c[5-6] gives
    # a1b3c5 a1b3c6 a2b3c5 a2b3c6 a1b4c5 ...
    k = len(groups)
    order = [*range(k - 2, -1, -1), k - 1]
    hosts = []
    chosen = [""] * k
    for combo in itertools.product(*(groups[i] for i in order)):
        for i, value in zip(order, combo, strict=True):
            chosen[i] = value
        hosts.append("".join(itertools.chain.from_iterable(zip(literals, [*chosen, ""], strict=True))))
    return hosts


def expand_hostlist(text: str) -> list[str]:
    """The hosts of a Slurm host list, in the order ``scontrol show hostnames``
    prints them: ``node[01-04,07],gpu3`` gives node01 node02 node03 node04
    node07 gpu3.

    Hosts are separated by commas or white space; a bracket holds numbers and
    ranges ``lo-hi``, each zero-padded to the width ``lo`` is written in
    (``[08-10]``: 08 09 10; ``[1-003]``: 1 2 3); a host may have several
    bracket groups (``r[1-2]n[1-3]``) and text after one (``a-[1-3]b``, which
    Slurm 22.05's scontrol refuses but which can only mean a-1b a-2b a-3b).
    Duplicates are kept.  Anything else (unbalanced or nested brackets,
    ``[3-1]``, ``[x]``, ``[1,]``) is a :class:`HostlistError`, a ``ValueError``.
    """
    return [host for token in _split_hostlist(text) for host in _expand_host(token)]


@dataclass(frozen=True)
class SlurmCoordinator:
    address: Address
    origin: str  # where host and port came from, for messages


def slurm_port(env: Mapping[str, str]) -> tuple[int, str] | None:
    """The rendezvous port for this Slurm step, and where it came from.

    The first port the step reserved (``srun --resv-ports`` sets
    ``SLURM_STEP_RESV_PORTS``, e.g. ``12000-12015`` or ``12000,12005``); else
    one derived from ``SLURM_JOB_ID`` and ``SLURM_STEP_ID``, different for
    every step of a job.  ``None`` without a job id.
    """
    reserved = env.get("SLURM_STEP_RESV_PORTS", "").strip()
    if reserved:
        m = re.match(r"(\d+)", reserved)
        if m is None or not 0 < int(m.group(1)) < 65536:
            raise CommError(f"SLURM_STEP_RESV_PORTS={reserved!r} does not start with a port number")
        return int(m.group(1)), "the first port of SLURM_STEP_RESV_PORTS"
    job_text = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
    if not job_text:
        return None
    step_text = env.get("SLURM_STEP_ID") or env.get("SLURM_STEPID") or "0"
    try:
        job, step = int(job_text), int(step_text)
    except ValueError:
        raise CommError(f"SLURM_JOB_ID={job_text!r} / SLURM_STEP_ID={step_text!r} are not integers") from None
    port = SLURM_PORT_BASE + (job * SLURM_STEPS_PER_JOB + step) % SLURM_PORT_SPAN
    return port, "a port derived from SLURM_JOB_ID and SLURM_STEP_ID"


def slurm_coordinator(env: Mapping[str, str]) -> SlurmCoordinator | None:
    """Rank 0's rendezvous address in a Slurm step: the first host of the
    step's node list and :func:`slurm_port`.  ``None`` when Slurm says
    neither where nor which port.  A first host that does not resolve here is
    a :class:`CommError` that names it (set ``AIOCOMM_COORDINATOR`` then)."""
    var = next((v for v in SLURM_NODELIST_VARS if env.get(v, "").strip()), None)
    if var is None:
        return None
    try:
        host = next(iter(expand_hostlist(env[var])), None)
    except HostlistError as exc:
        raise CommError(f"{var}: {exc}; set AIOCOMM_COORDINATOR=host:port") from None
    port = slurm_port(env)
    if host is None or port is None:
        return None
    origin = f"the first host of {var} and {port[1]}"
    try:
        socket.getaddrinfo(host, port[0], type=socket.SOCK_STREAM)
    except OSError as exc:
        raise CommError(
            f"rank 0's node {host!r} ({origin}) does not resolve here ({exc}); "
            "set AIOCOMM_COORDINATOR=host:port to an address of rank 0's node"
        ) from None
    return SlurmCoordinator((host, port[0]), origin)
