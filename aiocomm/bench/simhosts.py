"""Simulated hosts on one machine: network namespaces on a bridge.

Each host is a network namespace with its own address and an ``eth0`` veth
link to a bridge (in a namespace of its own), optionally shaped to a rate
with ``tbf`` on both ends, so the hosts' traffic crosses a real link of that
rate, as between machines.  Nothing in the machine's own namespace changes,
and no packet leaves these namespaces.  Processes start in a host with
``ip netns exec`` (:meth:`SimulatedHosts.command`); :func:`rsh` is a
stand-in for ssh that does the same, for launchers that reach hosts by ssh
(``aiocomm-launch --ssh``, ``mpirun --mca plm_rsh_agent``).  Needs root and
iproute2.

    python -m aiocomm.bench.simhosts rsh [-o OPT]... HOST COMMAND...
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import uuid
from types import TracebackType

#: Where a host's name can be looked up by the rsh stand-in: ADDRESS NAMESPACE lines.
MAP_DIR = "/run/aiocomm-simhosts"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def why_not() -> str | None:
    """Why simulated hosts cannot be made here, or None."""
    if shutil.which("ip") is None:
        return "iproute2's ip is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"aioprobe{uuid.uuid4().hex[:8]}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"this machine cannot create network namespaces: {made.stderr.strip()}"
    veth = _ip("-n", probe, "link", "add", "a0", "type", "veth", "peer", "name", "b0", check=False)
    _ip("netns", "del", probe, check=False)
    if veth.returncode != 0:
        return f"this machine cannot create veth links: {veth.stderr.strip()}"
    return None


class SimulatedHosts:
    """``count`` hosts ``198.18.<net>.1 ..``, made by :meth:`up` and removed,
    with every process in them, by :meth:`down` (also as a context manager)."""

    def __init__(self, count: int, rate: str | None = None, net: int = 1) -> None:
        self.count = count
        self.rate = None if rate in (None, "", "none") else rate  # a tc rate ("1gbit"), or None: unshaped
        tag = uuid.uuid4().hex[:6]
        self.names = [f"aio{tag}h{i}" for i in range(count)]
        self.switch = f"aio{tag}sw"
        self.addresses = [f"198.18.{net}.{i + 1}" for i in range(count)]

    def __enter__(self) -> SimulatedHosts:
        self.up()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.down()

    def up(self) -> None:
        try:
            _ip("netns", "add", self.switch)
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
            for i, (name, address) in enumerate(zip(self.names, self.addresses, strict=True)):
                _ip("netns", "add", name)
                _ip("link", "add", "eth0", "netns", name, "type", "veth", "peer", "name", f"p{i}", "netns", self.switch)
                _ip("-n", self.switch, "link", "set", f"p{i}", "master", "br0")
                _ip("-n", self.switch, "link", "set", f"p{i}", "up")
                _ip("-n", name, "addr", "add", f"{address}/24", "dev", "eth0")
                _ip("-n", name, "link", "set", "eth0", "up")
                _ip("-n", name, "link", "set", "lo", "up")
                if self.rate:
                    for ns, dev in ((name, "eth0"), (self.switch, f"p{i}")):
                        subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
                                        "rate", self.rate, "burst", "256kb", "latency", "20ms"],
                                       check=True, capture_output=True)
            os.makedirs(MAP_DIR, exist_ok=True)
            for name, address in zip(self.names, self.addresses, strict=True):
                with open(os.path.join(MAP_DIR, address), "w") as fh:
                    fh.write(name)
        except BaseException:
            self.down()
            raise

    def down(self) -> None:
        """Remove every namespace (and end every process still in one)."""
        for name in [*self.names, self.switch]:
            pids = _ip("netns", "pids", name, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), 9)
                except (OSError, ValueError):
                    pass
            _ip("netns", "del", name, check=False)
        for name, address in zip(self.names, self.addresses, strict=True):
            path = os.path.join(MAP_DIR, address)
            try:
                with open(path) as fh:
                    mine = fh.read() == name
                if mine:
                    os.unlink(path)
            except OSError:
                pass

    def command(self, host: int, argv: list[str]) -> list[str]:
        """``argv`` run on host ``host``."""
        return _in_host(self.names[host], argv)

    def rsh(self) -> str:
        """An ``--ssh`` / ``plm_rsh_agent`` command that reaches these hosts by address."""
        return f"{shlex.quote(sys.executable)} -m aiocomm.bench.simhosts rsh"


def rsh(argv: list[str]) -> None:
    """ssh's calling convention (``[-o OPT | -x ...]... HOST COMMAND...``),
    run by ``ip netns exec`` in the namespace of the host with that address."""
    args = list(argv)
    while args and args[0].startswith("-"):
        flag = args.pop(0)
        if flag in ("-o", "-p", "-l", "-i", "-F") and args:
            args.pop(0)
    if len(args) < 2:
        raise SystemExit("usage: python -m aiocomm.bench.simhosts rsh [-o OPT]... HOST COMMAND...")
    host, command = args[0], " ".join(args[1:])
    try:
        with open(os.path.join(MAP_DIR, host)) as fh:
            name = fh.read().strip()
    except OSError:
        raise SystemExit(f"aiocomm.bench.simhosts: no simulated host has the address {host!r}") from None
    argv = _in_host(name, ["sh", "-c", command])
    os.execvp(argv[0], argv)


def _in_host(name: str, argv: list[str]) -> list[str]:
    """``argv`` in the host's network namespace, with the host's name (a UTS
    namespace of its own: programs that tell hosts apart by their names, as
    Open MPI does, see two hosts)."""
    return ["ip", "netns", "exec", name, "unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', name, *argv]


if __name__ == "__main__":
    if sys.argv[1:2] == ["rsh"]:
        rsh(sys.argv[2:])
    else:
        raise SystemExit(__doc__)
