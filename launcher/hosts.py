"""Where the ranks run: ``--hosts`` and ``--hostfile`` (the formats ``mlx.launch`` reads).

A hostfile is JSON, either a list of host objects or a map with ``hosts``::

    [{"ssh": "node1", "ips": ["10.0.0.1"]}, {"ssh": "node2", "ips": ["10.0.0.2"]}]
    {"backend": "ring", "envs": ["OMP_NUM_THREADS=1"], "hosts": [...]}

``ssh`` is how to reach the host, ``ips`` the addresses its ranks listen on
(the ssh name when absent).
"""

from __future__ import annotations

import ipaddress
import json
import socket
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Host:
    ssh: str
    ips: tuple[str, ...]

    @property
    def listen_ip(self) -> str:
        return self.ips[0] if self.ips else self.ssh


@dataclass
class HostPlan:
    hosts: list[Host]
    envs: list[str] = field(default_factory=list)
    backend: str | None = None


class HostfileError(ValueError):
    pass


def parse_hosts(text: str) -> HostPlan:
    names = [h.strip() for h in text.split(",") if h.strip()]
    if not names:
        raise HostfileError("--hosts is empty")
    return HostPlan([Host(n, ()) for n in names])


def read_hostfile(path: str) -> HostPlan:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except OSError as exc:
        raise HostfileError(f"cannot read hostfile {path!r}: {exc}") from exc
    except ValueError as exc:
        raise HostfileError(f"hostfile {path!r} is not valid JSON: {exc}") from exc
    plan = HostPlan([])
    if isinstance(data, dict):
        plan.backend = data.get("backend")
        envs = data.get("envs", [])
        if not isinstance(envs, list) or not all(isinstance(e, str) and "=" in e for e in envs):
            raise HostfileError(f"hostfile {path!r}: 'envs' must be a list of 'KEY=VALUE' strings")
        plan.envs = envs
        data = data.get("hosts")
    if not isinstance(data, list) or not data:
        raise HostfileError(f"hostfile {path!r} needs a non-empty list of hosts")
    for i, entry in enumerate(data):
        if isinstance(entry, str):
            entry = {"ssh": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("ssh"), str):
            raise HostfileError(f"hostfile {path!r}: host {i} needs an 'ssh' name")
        ips = entry.get("ips", [])
        if not isinstance(ips, list) or not all(isinstance(ip, str) for ip in ips):
            raise HostfileError(f"hostfile {path!r}: host {i} 'ips' must be a list of strings")
        plan.hosts.append(Host(entry["ssh"], tuple(ips)))
    return plan


_LOCAL_NAMES = {"localhost", "127.0.0.1", "::1", "ip6-localhost"}


def is_local(host: Host) -> bool:
    """Run this host's ranks as children of the launcher (no ssh)?

    Only the machine's own names count: ``localhost``/``127.0.0.1``/``::1`` and
    its hostname.  Other loopback addresses (127.0.0.2, ...) are treated as
    hosts of their own and reached over ssh, as a real cluster's would be.
    """
    name = host.ssh.split("@")[-1]
    return name in _LOCAL_NAMES or name in (socket.gethostname(), socket.getfqdn())


def format_address(ip: str, port: int) -> str:
    try:
        if isinstance(ipaddress.ip_address(ip), ipaddress.IPv6Address):
            return f"[{ip}]:{port}"
    except ValueError:
        pass
    return f"{ip}:{port}"
