"""Joining a group started by another tool: torchrun, mpirun, srun.

Those tools give each process its rank and the group size but no hostfile.
Rank 0 then runs a small rendezvous service at the *coordinator* address;
every rank (rank 0 too) binds its own listening socket on the interface it
uses to reach the coordinator, publishes that address, and receives the full
list back.  The result is an ordinary :class:`~aiocomm.config.WorldSpec`, and
the ring forms as usual.  The coordinator is ``AIOCOMM_COORDINATOR``, else
``MASTER_ADDR``:``MASTER_PORT + 1``, else for srun's tasks the first node of
the step (:func:`aiocomm.config.slurm_coordinator`).

The service speaks aiocomm's wire format (control frames with msgpack maps)::

    coordinator -> rank   CHALLENGE {nonce}
    rank -> coordinator   JOIN      {rank, size, address, mac}
    coordinator -> rank   ROSTER    {addresses}      once every rank has joined
                          or REJECT {reason}

``mac`` is an HMAC of the nonce and the join fields keyed by ``AIOCOMM_TOKEN``
(empty when unset), so with a token a stranger cannot take a rank's place.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from . import wire
from .config import Address, WorldSpec, parse_address, slurm_coordinator, token_from_env
from .errors import AuthenticationError, CommError, CommTimeoutError, ProtocolError
from .transport.connections import backoff
from .wire import Kind

#: (rank variable, size variable, tool), in order of precedence.
JOIN_SOURCES: tuple[tuple[str, str, str], ...] = (
    ("RANK", "WORLD_SIZE", "torchrun"),
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "Open MPI"),
    ("PMI_RANK", "PMI_SIZE", "MPICH/Hydra"),
    ("SLURM_PROCID", "SLURM_NTASKS", "Slurm"),
)


@dataclass(frozen=True)
class JoinSpec:
    rank: int
    size: int
    coordinator: Address
    token: bytes
    source: str


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise CommError(f"{name}={env[name]!r} is not an integer") from None


def started_by_srun(env: Mapping[str, str], rank_var: str) -> bool:
    """Whether the ranks are srun's tasks: taken from ``SLURM_PROCID``, or from
    ``PMI_RANK`` that srun's pmi2 plugin set (its ``PMI_JOBID`` is the step,
    ``JOB.STEP``).  Not ranks that mpirun started inside an allocation: those
    may run where Slurm's node list does not say."""
    if rank_var == "SLURM_PROCID":
        return True
    step = f"{env.get('SLURM_JOB_ID', '')}.{env.get('SLURM_STEP_ID', '')}"
    return rank_var == "PMI_RANK" and env.get("PMI_JOBID") == step and step != "."


def coordinator_from_env(env: Mapping[str, str], source: str, mpi_unavailable: str = "", *,
                         rank_var: str = "") -> Address:
    """Where rank 0 runs the rendezvous.  First match wins:
    ``AIOCOMM_COORDINATOR``; ``MASTER_ADDR`` and ``MASTER_PORT + 1``; for
    srun's tasks (``rank_var`` tells), the first node of the step and a port
    of the step (:func:`aiocomm.config.slurm_coordinator`).
    ``mpi_unavailable``: why the MPI backend, which an MPI launcher's job
    would otherwise use, is not (the likely fix when no address is set)."""
    text = env.get("AIOCOMM_COORDINATOR")
    if text:
        return parse_address(text, where="AIOCOMM_COORDINATOR")
    if env.get("MASTER_ADDR") and env.get("MASTER_PORT"):
        # torchrun's own store already listens on MASTER_PORT: take the next one.
        host, port = parse_address(f"{env['MASTER_ADDR']}:{env['MASTER_PORT']}", where="MASTER_ADDR/MASTER_PORT")
        if port >= 65535:
            raise CommError(f"MASTER_PORT={port} leaves no port above it for aiocomm's rendezvous")
        return host, port + 1
    if started_by_srun(env, rank_var):
        found = slurm_coordinator(env)
        if found is not None:
            return found.address
    if mpi_unavailable:
        raise CommError(
            f"started by {source}, but aiocomm's MPI backend is unavailable: {mpi_unavailable}. "
            "(To join over TCP without it instead, set AIOCOMM_COORDINATOR=host:port to where rank 0 can listen.)"
        )
    raise CommError(
        f"started by {source} but no coordinator address: set AIOCOMM_COORDINATOR=host:port "
        "(or MASTER_ADDR and MASTER_PORT) to where rank 0 can listen"
    )


def join_spec_from_env(environ: Mapping[str, str] | None = None, mpi_unavailable: str = "") -> JoinSpec | None:
    """The group another tool started this process in, or ``None``
    (``mpi_unavailable``: see :func:`coordinator_from_env`)."""
    env = os.environ if environ is None else environ
    for rank_var, size_var, tool in JOIN_SOURCES:
        if rank_var in env and size_var in env:
            rank, size = _int(env, rank_var), _int(env, size_var)
            source = f"{tool} ({rank_var}/{size_var})"
            if not 0 <= rank < size:
                raise CommError(f"{rank_var}={rank} is outside the group of {size_var}={size}")
            coordinator = (coordinator_from_env(env, source, mpi_unavailable, rank_var=rank_var) if size > 1
                           else ("127.0.0.1", 1))
            return JoinSpec(rank, size, coordinator, token_from_env(env), source)
    return None


def looked_for() -> str:
    return ", ".join(f"{r} + {s}" for r, s, _ in JOIN_SOURCES)


def _join_mac(token: bytes, nonce: bytes, rank: int, size: int, address: str) -> bytes:
    msg = b"join" + nonce + f"{rank}:{size}:{address}".encode()
    return hmac.new(token, msg, hashlib.sha256).digest()


async def _read_frame(reader: asyncio.StreamReader) -> tuple[wire.Header, Any]:
    header = wire.decode_header(await reader.readexactly(wire.HEADER_SIZE))
    meta = wire.decode_meta(await reader.readexactly(header.meta_len)) if header.meta_len else None
    return header, meta


class Coordinator:
    """Rank 0's rendezvous service: collects every rank's address."""

    def __init__(self, spec: JoinSpec) -> None:
        self.spec = spec
        self.addresses: list[str | None] = [None] * spec.size
        self.writers: list[asyncio.StreamWriter] = []
        self.complete = asyncio.get_running_loop().create_future()
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        host, port = self.spec.coordinator
        try:
            self.server = await asyncio.start_server(self._serve, host, port, reuse_address=True)
        except OSError as exc:
            raise CommError(f"rank 0 cannot run the rendezvous service on {host}:{port}: {exc}") from exc

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonce = os.urandom(wire.NONCE_SIZE)
        try:
            writer.write(wire.control_frame(Kind.CHALLENGE, {"nonce": nonce}))
            header, meta = await asyncio.wait_for(_read_frame(reader), 30)
            if header.kind != Kind.JOIN:
                raise ProtocolError(f"expected JOIN, got {header.kind.name}")
            m = wire.require_map(meta, Kind.JOIN, ("rank", "size", "address", "mac"))
            rank, size, address, mac = m["rank"], m["size"], m["address"], m["mac"]
            if size != self.spec.size or not isinstance(rank, int) or not 0 <= rank < size:
                raise ProtocolError(f"JOIN for rank {rank!r} of {size!r} does not fit a group of {self.spec.size}")
            if not isinstance(address, str) or not isinstance(mac, bytes):
                raise ProtocolError("malformed JOIN map")
            parse_address(address, where=f"rank {rank}'s JOIN")
            if not hmac.compare_digest(mac, _join_mac(self.spec.token, nonce, rank, size, address)):
                raise AuthenticationError(f"rank {rank} failed authentication (AIOCOMM_TOKEN differs)")
            if self.addresses[rank] is not None:
                raise ProtocolError(f"rank {rank} joined twice")
        except (ProtocolError, CommError, asyncio.IncompleteReadError, asyncio.TimeoutError, OSError) as exc:
            refusal = {"reason": str(exc), "authentication": isinstance(exc, AuthenticationError)}
            try:
                writer.write(wire.control_frame(Kind.REJECT, refusal))
            finally:
                writer.close()
            return
        self.addresses[rank] = address
        self.writers.append(writer)
        if all(a is not None for a in self.addresses):
            roster = wire.control_frame(Kind.ROSTER, {"addresses": self.addresses})
            for w in self.writers:
                w.write(roster)
                w.close()
            if not self.complete.done():
                self.complete.set_result(None)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


def _listen_near(coordinator: Address, rank: int) -> tuple[socket.socket, str]:
    """A listening socket on the interface that routes to the coordinator."""
    host, port = coordinator
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    family, _, _, _, sockaddr = infos[0]
    probe = socket.socket(family, socket.SOCK_DGRAM)
    try:
        probe.connect(sockaddr)  # no packet is sent: this only picks the route
        local_ip = probe.getsockname()[0]
    finally:
        probe.close()
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.bind((local_ip, 0))
    listener.listen(1024)
    bound = listener.getsockname()[1]
    address = f"[{local_ip}]:{bound}" if family == socket.AF_INET6 else f"{local_ip}:{bound}"
    return listener, address


async def rendezvous(spec: JoinSpec, timeout: float) -> WorldSpec:
    """Exchange listening addresses through the coordinator; returns the world."""
    if spec.size == 1:
        return WorldSpec(0, ((("127.0.0.1", 1),),), spec.token, spec.source)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    coordinator: Coordinator | None = None
    if spec.rank == 0:
        coordinator = Coordinator(spec)
        await coordinator.start()
    listener, address = _listen_near(spec.coordinator, spec.rank)
    host, port = spec.coordinator
    try:
        last: BaseException | None = None
        for delay in backoff():
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(host, port), max(0.01, deadline - loop.time())
                )
                break
            except (OSError, asyncio.TimeoutError) as exc:
                last = exc
            if loop.time() + delay >= deadline:
                raise CommTimeoutError(
                    f"rank {spec.rank} could not reach the coordinator at {host}:{port} within "
                    f"{timeout:.1f}s (last error: {last!r})",
                    (0,),
                ) from last
            await asyncio.sleep(delay)
        try:
            header, meta = await asyncio.wait_for(_read_frame(reader), max(0.01, deadline - loop.time()))
            nonce = wire.require_map(meta, Kind.CHALLENGE, ("nonce",))["nonce"]
            fields = {
                "rank": spec.rank,
                "size": spec.size,
                "address": address,
                "mac": _join_mac(spec.token, nonce, spec.rank, spec.size, address),
            }
            writer.write(wire.control_frame(Kind.JOIN, fields))
            header, meta = await asyncio.wait_for(_read_frame(reader), max(0.01, deadline - loop.time()))
        except asyncio.TimeoutError:
            raise CommTimeoutError(
                f"rank {spec.rank}: not every rank joined at the coordinator {host}:{port} within {timeout:.1f}s",
                (0,),
            ) from None
        finally:
            writer.close()
        if header.kind == Kind.REJECT:
            if isinstance(meta, dict) and meta.get("authentication") is True:
                raise AuthenticationError(
                    f"coordinator {host}:{port} refused rank {spec.rank}'s proof of the job token "
                    f"({meta.get('reason')}): AIOCOMM_TOKEN differs between this rank and rank 0 (ranks started "
                    "with different tokens, or another job's rendezvous at that address?)"
                )
            raise CommError(f"coordinator {host}:{port} rejected rank {spec.rank}: {meta}")
        if header.kind != Kind.ROSTER:
            raise ProtocolError(f"coordinator {host}:{port} answered {header.kind.name}, not ROSTER")
        roster = wire.require_map(meta, Kind.ROSTER, ("addresses",))["addresses"]
        if not isinstance(roster, list) or len(roster) != spec.size:
            raise ProtocolError(f"coordinator {host}:{port} sent a malformed roster")
        addresses = tuple((parse_address(a, where=f"roster entry {i}"),) for i, a in enumerate(roster))
        if coordinator is not None:
            await asyncio.wait_for(coordinator.complete, max(0.01, deadline - loop.time()))
    except BaseException:
        listener.close()
        raise
    finally:
        if coordinator is not None:
            coordinator.close()
    return WorldSpec(spec.rank, addresses, spec.token, spec.source, (listener.detach(),))
