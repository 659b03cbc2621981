"""aiocomm on simulated hosts, beside its flat ring and Open MPI, in one run.

    python -m aiocomm.bench.hosts --hosts 2 --per-host 2 --rate 1gbit --sizes 8,1M,64M

Makes ``--hosts`` network namespaces on a bridge, their links shaped to
``--rate`` (:mod:`aiocomm.bench.simhosts`; needs root), starts
``--per-host`` ranks on each through an ssh stand-in, and measures, one
after the other on the same links: aiocomm as it chooses (``aiocomm``:
two levels when a host has several ranks), aiocomm's flat ring
(``aiocomm-flat``: ``AIOCOMM_TWO_LEVEL=0``), Open MPI over TCP only
(``openmpi``: ``btl tcp,self``) and Open MPI with its shared memory inside a
host (``openmpi-shm``: ``btl vader,tcp,self``); a peer that is not installed
is skipped with a message.  Prints one table: the time per call, the
algorithm bandwidth (bytes of the buffer per second of the call) and what it
is of the link rate, and aiocomm's speed relative to each peer.  The
namespaces are removed at the end, also after a failure.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Any

from .compare import _peer_modules_available, _tool, peer_rows
from .run import AVERAGES
from .simhosts import SimulatedHosts, why_not

PEERS = ("aiocomm", "aiocomm-flat", "openmpi", "openmpi-shm")
_RATE_UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "bps": 8, "kbps": 8e3, "mbps": 8e6, "gbps": 8e9}


def link_bytes_per_second(rate: str) -> float | None:
    """A tc rate ("1gbit", "500mbit") in bytes per second; None for "none"."""
    if rate in ("", "none"):
        return None
    m = re.fullmatch(r"([\d.]+)\s*([a-z]+)", rate.strip().lower())
    if m is None or m.group(2) not in _RATE_UNITS:
        raise SystemExit(f"--rate {rate!r}: expected a number and one of {', '.join(_RATE_UNITS)} (as tc takes it)")
    return float(m.group(1)) * _RATE_UNITS[m.group(2)] / 8


def commands(peer: str, hosts: SimulatedHosts, per_host: int, common: list[str]) -> list[str] | str:
    py = sys.executable
    n = hosts.count * per_host
    if peer.startswith("aiocomm"):
        env = ["--env", "AIOCOMM_TWO_LEVEL=0"] if peer == "aiocomm-flat" else []
        return [py, "-m", "aiocomm_launch", "--hosts", ",".join(hosts.addresses), "-n", str(per_host),
                "--ssh", hosts.rsh(), *env, py, "-m", "aiocomm.bench", "--json", *common]
    mpirun = _tool("mpirun")
    if mpirun is None or not _peer_modules_available("mpi4py"):
        return "mpirun or mpi4py is not installed"
    btl = "tcp,self" if peer == "openmpi" else "vader,tcp,self"
    passed = [arg for var in ("PYTHONPATH",) if var in os.environ for arg in ("-x", var)]
    # mpirun runs on the first host: its daemons on the others call back to it.
    return hosts.command(0, [
        mpirun, "--allow-run-as-root", "--mca", "plm_rsh_agent", hosts.rsh(),
        "--mca", "btl", btl, "--mca", "btl_tcp_if_include", "eth0", "--mca", "oob_tcp_if_include", "eth0",
        "--mca", "mpi_yield_when_idle", "1",  # (more ranks than cores here: spinning would starve the others)
        "--host", ",".join(f"{a}:{per_host}" for a in hosts.addresses), "-n", str(n), *passed,
        py, "-m", "aiocomm.bench.peers", "mpi", *common])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m aiocomm.bench.hosts", description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", type=int, default=2, help="simulated hosts (default 2)")
    parser.add_argument("--per-host", type=int, default=2, help="ranks on each host (default 2)")
    parser.add_argument("--rate", default="1gbit", help="each host's link, as tc takes it (default 1gbit; none)")
    parser.add_argument("--sizes", default="8,1M,64M")
    parser.add_argument("--op", choices=["all_sum", "all_gather"], default="all_sum")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--small-iters", type=int, default=200, help="timed iterations for sizes under 1 MiB")
    parser.add_argument("--average", choices=list(AVERAGES), default="avg")
    parser.add_argument("--peers", default=",".join(PEERS))
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args(argv)
    why = why_not()
    if why is not None:
        raise SystemExit(f"python -m aiocomm.bench.hosts: simulated hosts cannot be made here: {why}")
    link = link_bytes_per_second(args.rate)
    common = ["--op", args.op, "--sizes", args.sizes, "--iters", str(args.iters),
              "--small-iters", str(args.small_iters), "--average", args.average]
    results: dict[tuple[str, int], dict[str, Any]] = {}
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    with SimulatedHosts(args.hosts, args.rate) as hosts:
        for peer in peers:
            if peer not in PEERS:
                raise SystemExit(f"--peers: {peer!r} is not one of {', '.join(PEERS)}")
            for row in peer_rows(peer, commands(peer, hosts, args.per_host, common), args.timeout):
                results[(peer, row["bytes"])] = row
    print(f"# op={args.op} float32 on {args.hosts} simulated hosts x {args.per_host} ranks, links {args.rate}; "
          f"median of {args.iters} iterations ({args.small_iters} under 1 MiB; each iteration's time: "
          f"{AVERAGES[args.average]}), same links, same run")
    print("# algbw: bytes of the buffer per second of the call; busbw: algbw x the bytes a flat ring moves per "
          "byte (2(n-1)/n for all_sum, (n-1)/n for all_gather); of_link: either, as a fraction of --rate")
    print(f"# {'peer':<13} {'bytes':>10} {'median_us':>11} {'algbw_GB/s':>10} {'of_link':>7} {'busbw_GB/s':>10} "
          f"{'of_link':>7} {'aiocomm/peer':>12} correct")
    for (peer, nbytes), row in sorted(results.items(), key=lambda kv: (kv[0][1], PEERS.index(kv[0][0]))):
        mine = results.get(("aiocomm", nbytes))
        of_link = f"{row['algbw_GBps'] * 1e9 / link:.2f}" if link else "-"
        bus_of_link = f"{row['busbw_GBps'] * 1e9 / link:.2f}" if link else "-"
        if mine is None or peer == "aiocomm":
            ratio = ""
        elif nbytes >= 1 << 20:
            ratio = f"{mine['algbw_GBps'] / row['algbw_GBps']:.2f}x bw"
        else:
            ratio = f"{row['median_us'] / mine['median_us']:.2f}x lat"
        print(f"  {peer:<13} {nbytes:>10} {row['median_us']:>11.1f} {row['algbw_GBps']:>10.4f} {of_link:>7} "
              f"{row['busbw_GBps']:>10.4f} {bus_of_link:>7} {ratio:>12} {'yes' if row['correct'] else 'NO'}",
              flush=True)


if __name__ == "__main__":
    main()
