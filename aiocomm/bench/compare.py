"""aiocomm side by side with the systems people would pick instead, in one run.

    python -m aiocomm.bench.compare --ranks 2,4 --sizes 8,1M,64M --op all_sum

Runs ``python -m aiocomm.bench --json`` under ``aiocomm-launch`` and the same
measurement for torch's gloo (under torchrun), OpenMPI (mpirun + mpi4py),
MLX's ring backend (mlx.launch) and, for 2 ranks, the physical duplex
reference; Open MPI twice: over loopback TCP (``openmpi``) and with its own
choice on one host, shared memory (``openmpi-shm``); a peer that is not
installed is skipped with a message (``--op sendrecv``: messages, beside
Open MPI's ``Send``/``Recv`` only).  Prints
one table with aiocomm's bus bandwidth as a ratio of each peer's; with
``--plot FILE.png`` also draws bus bandwidth and latency against message
size, one line per library and rank count (matplotlib: ``pip install
'aiocomm[plot]'``).

``--floor PATH`` adds the floor (``floor``: ``../shared/bench/floor_shm_allsum.py``,
plain numpy on one shared mapping) as a peer of all_sum, and ``--rounds K``
runs every peer K times per rank count, in turn (the order reversed every
other round), with a table per round and each ratio taken within its round.
Ratios of runs minutes apart mislead on a shared machine: on the 2-core
development VM the floor itself and aiocomm both swing between about 105 and
600 us at 1 MiB, 2 ranks, for spells of tens of seconds (six runs of each
in turn, session 20).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .run import AVERAGES, parse_sizes

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: Results by (peer, ranks, bytes): a row of ``python -m aiocomm.bench --json``.
Results = dict[tuple[str, int, int], dict[str, Any]]

PLOT_HINT = "--plot needs matplotlib: pip install 'aiocomm[plot]' (or: pip install matplotlib)"


def _tool(name: str) -> str | None:
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _peer_modules_available(module: str) -> bool:
    return subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True).returncode == 0


def commands(peer: str, ranks: int, op: str, common: list[str], floor: list[str] | None = None
             ) -> list[str] | str | None:
    """How to run ``peer`` on ``ranks`` ranks; the reason it is skipped, or
    None if it has nothing to say here.  ``floor``: the floor's script and
    its sizes in bytes (``--floor``)."""
    py = sys.executable
    if peer == "floor":
        if op != "all_sum":
            return "the floor measures all_sum only"
        if floor is None:
            return "pass --floor PATH (../shared/bench/floor_shm_allsum.py)"
        return [py, floor[0], str(ranks), *floor[1:]]
    if peer == "aiocomm":
        return [py, "-m", "aiocomm_launch", "-n", str(ranks), py, "-m", "aiocomm.bench", "--json", *common]
    if op == "broadcast" and peer in ("gloo", "mlx-ring"):
        return f"its benchmark here has no broadcast{' (MLX has none)' if peer == 'mlx-ring' else ''}"
    if op == "sendrecv" and peer in ("gloo", "mlx-ring"):
        return "its benchmark here has no sendrecv"
    if peer == "gloo":
        torchrun = _tool("torchrun")
        if torchrun is None or not _peer_modules_available("torch"):
            return "torch (torchrun) is not installed"
        return [torchrun, "--nproc-per-node", str(ranks), "--master-port", str(_free_port()),
                "-m", "aiocomm.bench.peers", "gloo", *common]
    if peer in ("openmpi", "openmpi-shm"):
        mpirun = _tool("mpirun")
        if mpirun is None or not _peer_modules_available("mpi4py"):
            return "mpirun or mpi4py is not installed"
        # "openmpi": TCP over loopback, as aiocomm's TCP transport; "openmpi-shm": Open MPI's own
        # choice on one host (its shared-memory BTL, vader).
        how = [] if peer == "openmpi-shm" else ["--mca", "btl", "tcp,self", "--mca", "btl_tcp_if_include", "lo"]
        return [mpirun, "--oversubscribe", *how, "-n", str(ranks), py, "-m", "aiocomm.bench.peers", "mpi",
                *common]
    if peer == "mlx-ring":
        launch = _tool("mlx.launch")
        if launch is None or not _peer_modules_available("mlx.core"):
            return "mlx (mlx.launch) is not installed"
        return [launch, "--backend", "ring", "-n", str(ranks), "--starting-port", str(_free_port()),
                py, "-m", "aiocomm.bench.peers", "mlx", *common]
    if peer == "duplex-reference":
        if ranks != 2 or op != "all_sum":
            return None  # the reference moves what a 2-rank all_sum moves
        return [py, "-m", "aiocomm.bench.peers", "duplex", *common]
    raise ValueError(peer)


def _as_row(row: dict[str, Any]) -> dict[str, Any]:
    """A row as ``python -m aiocomm.bench --json`` prints it (the floor's
    own lines name their figures ``us`` and ``busbw``; it checks its result
    with an assertion, so a line it prints is a correct run)."""
    if "median_us" in row or "us" not in row:
        return row
    return {"bytes": row["bytes"], "median_us": row["us"], "busbw_GBps": row["busbw"], "correct": True}


def run(cmd: list[str], timeout: float) -> list[dict[str, Any]]:
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    rows = []
    for line in proc.stdout.splitlines():
        line = line.split("] ", 1)[1] if line.startswith("[rank ") else line
        if line.startswith("{"):
            rows.append(_as_row(json.loads(line)))
    if proc.returncode != 0 and not rows:
        raise RuntimeError(f"{' '.join(cmd[:3])}... failed: {proc.stderr[-800:]}")
    return rows


def peer_rows(peer: str, cmd: list[str] | str | None, timeout: float, where: str = "") -> list[dict[str, Any]]:
    """The rows ``peer``'s command printed; none (saying why on stdout) if the
    peer is skipped (``cmd`` None or the reason) or its run failed."""
    if cmd is None:
        return []
    if isinstance(cmd, str):
        print(f"# skipping {peer}: {cmd}", flush=True)
        return []
    try:
        return run(cmd, timeout)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        print(f"# {peer}{where} failed: {exc}", flush=True)
        return []


def require_matplotlib() -> None:
    """Fail at once, before any benchmark runs, when ``--plot`` cannot draw."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit(f"python -m aiocomm.bench.compare: {PLOT_HINT}") from None


def _size_label(nbytes: float) -> str:
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if nbytes >= 1 << shift and int(nbytes) % (1 << shift) == 0:
            return f"{int(nbytes) >> shift}{unit}"
    return f"{int(nbytes)}"


def draw(results: Results, title: str) -> Figure:
    """Two panels against message size (log scale), as nccl-tests' users
    draw them: bus bandwidth (GB/s) and latency (median us), one line per
    library and rank count."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    fig = Figure(figsize=(12, 4.8), layout="constrained")
    bw_ax, lat_ax = fig.subplots(1, 2)
    lines = sorted({(peer, ranks) for peer, ranks, _ in results}, key=lambda pr: (pr[0] != "aiocomm", pr))
    for peer, ranks in lines:
        sizes = sorted(n for p, r, n in results if (p, r) == (peer, ranks))
        rows = [results[(peer, ranks, n)] for n in sizes]
        style = {"marker": "o", "markersize": 4, "linewidth": 2.2 if peer == "aiocomm" else 1.4,
                 "label": f"{peer}, {ranks} ranks" if peer != "duplex-reference" else "duplex reference (wire)"}
        bw_ax.plot(sizes, [row["busbw_GBps"] for row in rows], **style)
        lat_ax.plot(sizes, [row["median_us"] for row in rows], **style)
    sizes_fmt = FuncFormatter(lambda x, _pos: _size_label(x))
    for ax, ylabel in ((bw_ax, "bus bandwidth (GB/s)"), (lat_ax, "latency, median (us)")):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(sizes_fmt)
        ax.set_xlabel("message size (bytes)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="major", alpha=0.3)
    lat_ax.set_yscale("log")
    bw_ax.set_title("bus bandwidth")
    lat_ax.set_title("latency")
    bw_ax.legend(fontsize="small")
    fig.suptitle(title)
    return fig


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m aiocomm.bench.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", default="2,4")
    parser.add_argument("--sizes", default="8,1M,64M")
    parser.add_argument("--op", choices=["all_sum", "all_gather", "broadcast", "sendrecv"], default="all_sum")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--small-iters", type=int, default=500, help="timed iterations for sizes under 1 MiB")
    parser.add_argument("--average", choices=list(AVERAGES), default="avg",
                        help="an iteration's time from the ranks' own times (nccl-tests' -a): mean, slowest, ...")
    parser.add_argument("--peers", default="aiocomm,duplex-reference,gloo,openmpi,openmpi-shm,mlx-ring")
    parser.add_argument("--transport", choices=["auto", "tcp", "shm"], default="auto",
                        help="aiocomm's transport between ranks of this host (python -m aiocomm.bench --transport)")
    parser.add_argument("--face", choices=["blocking", "async"], default="blocking",
                        help="aiocomm's face (python -m aiocomm.bench --face)")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--floor", metavar="PATH", default=None,
                        help="the floor's script (../shared/bench/floor_shm_allsum.py), run as the peer 'floor'")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every peer this many times per rank count, in turn; a table per round")
    parser.add_argument("--plot", metavar="FILE.png", default=None,
                        help="also draw bus bandwidth and latency against message size to FILE (needs matplotlib;"
                             " the first round)")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: at least 1")
    if args.plot:
        require_matplotlib()
    common = ["--op", args.op, "--sizes", args.sizes, "--iters", str(args.iters),
              "--small-iters", str(args.small_iters), "--average", args.average]
    floor = None
    if args.floor is not None:
        if not Path(args.floor).is_file():
            parser.error(f"--floor {args.floor}: no such file")
        floor = [args.floor, *map(str, parse_sizes(args.sizes))]
    rounds: list[Results] = [{} for _ in range(args.rounds)]
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    for ranks in (int(r) for r in args.ranks.split(",")):
        for k, results in enumerate(rounds):
            for peer in peers if k % 2 == 0 else peers[::-1]:  # (every other round the other way: no peer always first)
                extra = ["--transport", args.transport, "--face", args.face] if peer == "aiocomm" else []
                cmd = commands(peer, ranks, args.op, common + extra, floor)
                if k and isinstance(cmd, str):
                    continue  # (said once)
                for row in peer_rows(peer, cmd, args.timeout, f" with {ranks} ranks"):
                    results[(peer, ranks, row["bytes"])] = row
    how = AVERAGES[args.average]
    print(f"# op={args.op} float32, median of {args.iters} iterations ({args.small_iters} under 1 MiB; "
          f"each iteration's time: {how}), same machine, same run")
    for k, results in enumerate(rounds):
        if len(rounds) > 1:
            print(f"# round {k + 1} of {len(rounds)}")
        print(f"# {'peer':<17} {'ranks':>5} {'bytes':>10} {'median_us':>11} {'busbw_GB/s':>10} "
              f"{'aiocomm/peer':>12} correct")
        ordered = sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0] != "aiocomm"))
        for (peer, ranks, nbytes), row in ordered:
            ratio = _ratio(results, peer, ranks, nbytes)
            print(f"  {peer:<17} {ranks:>5} {nbytes:>10} {row['median_us']:>11.1f} {row['busbw_GBps']:>10.3f} "
                  f"{ratio:>12} {'yes' if row['correct'] else 'NO'}", flush=True)
    if len(rounds) > 1:
        print("# aiocomm/peer, round by round")
        for peer, ranks, nbytes in sorted({key for results in rounds for key in results if key[0] != "aiocomm"},
                                          key=lambda key: (key[1], key[2], key[0])):
            ratios = [_ratio(results, peer, ranks, nbytes) or "-" for results in rounds]
            print(f"  {peer:<17} {ranks:>5} {nbytes:>10}  {', '.join(ratios)}", flush=True)
    if args.plot:
        if not rounds[0]:
            raise SystemExit("python -m aiocomm.bench.compare: nothing ran, so there is nothing to plot")
        title = (f"{args.op}, float32, median of {args.iters} iterations ({args.small_iters} under 1 MiB; {how}), "
                 "same machine")
        draw(rounds[0], title).savefig(args.plot, dpi=120)
        print(f"# plot: {args.plot}", flush=True)


def _ratio(results: Results, peer: str, ranks: int, nbytes: int) -> str:
    """aiocomm's figure over ``peer``'s, both of ``results`` (one round):
    bus bandwidth from 1 MiB on, latency below; "" for aiocomm itself or
    where either is missing."""
    mine, row = results.get(("aiocomm", ranks, nbytes)), results.get((peer, ranks, nbytes))
    if mine is None or row is None or peer == "aiocomm":
        return ""
    if nbytes >= 1 << 20:
        return f"{mine['busbw_GBps'] / row['busbw_GBps']:.2f}x bw"
    return f"{row['median_us'] / mine['median_us']:.2f}x lat"

if __name__ == "__main__":
    main()
