"""Two-level collectives on simulated hosts: network namespaces made by the
suite (aiocomm.bench.simhosts) and removed after it, one address each, with
real processes in them (tests/workers/two_level.py).  Skipped, saying why,
where the machine cannot make namespaces (no root, no iproute2)."""

from __future__ import annotations

import itertools
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aiocomm.bench import simhosts

from .conftest import ROOT, WORKERS, clean_env

_ports = itertools.count(30000, 16)  # a fresh port range per job (no wait for the last job's sockets)


@pytest.fixture(scope="module")
def hosts():
    why = simhosts.why_not()
    if why is not None:
        pytest.skip(f"simulated hosts: {why}")
    with simhosts.SimulatedHosts(3) as made:
        yield made


def start(hosts: simhosts.SimulatedHosts, layout: list[int], tmp_path: Path, *args: str,
          env: dict[str, str] | None = None) -> list[subprocess.Popen[str]]:
    """``layout[h]`` ranks on host ``h``, ranks numbered host by host."""
    base = next(_ports)
    entries, where = [], []
    for h, count in enumerate(layout):
        for k in range(count):
            entries.append([f"{hosts.addresses[h]}:{base + k}"])
            where.append(h)
    hostfile = tmp_path / f"hosts-{base}.json"
    hostfile.write_text(json.dumps(entries))
    procs = []
    for rank, h in enumerate(where):
        rank_env = clean_env(AIOCOMM_RANK=str(rank), AIOCOMM_HOSTFILE=str(hostfile), AIOCOMM_TOKEN="t",
                             PYTHONPATH=str(ROOT), **(env or {}))
        procs.append(subprocess.Popen(hosts.command(h, [sys.executable, str(WORKERS / "two_level.py"), *args]),
                                      cwd=ROOT, env=rank_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    return procs


def finish(procs: list[subprocess.Popen[str]], timeout: float) -> list[tuple[int, str, str]]:
    deadline = time.monotonic() + timeout
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            outs.append((p.returncode, out, err))
    finally:
        for p in procs:
            p.kill()
    return outs


def run(hosts, layout, tmp_path, *args, env=None, timeout=150):
    return finish(start(hosts, layout, tmp_path, *args, env=env), timeout)


@pytest.mark.timeout(200)
@pytest.mark.parametrize("layout,slot", [([2, 2], "4096"), ([2, 2, 2], ""), ([3, 3], ""), ([3, 1], "4096"),
                                         ([1, 2, 2], "")],
                         ids=["2x2-small-slots", "3x2", "2x3", "3+1-small-slots", "1+2+2"])
def test_every_collective_every_dtype(hosts, tmp_path, layout, slot):
    """Every collective, dtype and odd size against numpy; a split of the
    world (one rank fewer) is two-level too.  With 4 KiB slots arrays move
    in many pipelined chunks."""
    outs = run(hosts, layout, tmp_path, "matrix", env={"AIOCOMM_SHM_SLOT_BYTES": slot} if slot else None)
    n = sum(layout)
    for rank, (code, out, err) in enumerate(outs):
        detail = f"rank {rank}: exit {code}\n{out[-3000:]}\n{err[-3000:]}"
        assert code == 0 and "MODE two-level" in out and "OK " in out, detail
        if rank:
            assert f"SPLIT two-level {n - 1}" in out or n - 1 == 1, detail


@pytest.mark.timeout(120)
def test_the_async_face_with_many_calls_in_flight(hosts, tmp_path):
    for rank, (code, out, err) in enumerate(run(hosts, [2, 2], tmp_path, "async")):
        assert code == 0 and "MODE two-level" in out and "ASYNC ok" in out, f"rank {rank}:\n{out}\n{err[-3000:]}"


@pytest.mark.timeout(120)
def test_two_level_can_be_turned_off(hosts, tmp_path):
    outs = run(hosts, [2, 2], tmp_path, "matrix", env={"AIOCOMM_TWO_LEVEL": "0"})
    for rank, (code, out, err) in enumerate(outs):
        assert code == 0 and "MODE flat" in out and "OK " in out, f"rank {rank}:\n{out}\n{err[-3000:]}"


@pytest.mark.timeout(120)
def test_one_rank_per_host_stays_flat(hosts, tmp_path):
    for code, out, err in run(hosts, [1, 1, 1], tmp_path, "matrix"):
        assert code == 0 and "MODE flat" in out and "OK " in out, f"{out}\n{err[-3000:]}"


@pytest.mark.timeout(90)
@pytest.mark.parametrize("phase,victim", [("intra", 1), ("inter", 2), ("inter", 0)])
def test_a_rank_killed_in_either_phase_fails_every_rank_in_time(hosts, tmp_path, phase, victim):
    """A rank SIGKILLed inside its host's barriers or while its ring between
    hosts has frames in flight: every other rank, on both hosts, raises
    within 5 s of its death, and no call returned a wrong result."""
    procs = start(hosts, [2, 2], tmp_path, "kill", phase, str(victim))
    try:
        procs[victim].wait(timeout=60)
        died = time.time()
        outs = finish([p for r, p in enumerate(procs) if r != victim], 30)
    finally:
        for p in procs:
            p.kill()
    assert procs[victim].returncode == -signal.SIGKILL, f"the victim ended with {procs[victim].returncode}"
    survivors = [r for r in range(4) if r != victim]
    for rank, (code, out, err) in zip(survivors, outs, strict=True):
        detail = f"rank {rank}: exit {code}\n{out[-3000:]}\n{err[-3000:]}"
        assert code == 0 and "MODE two-level" in out and "DONE" in out, detail
        m = re.search(r"FAILED (\w+) at ([\d.]+): (.*)", out)
        assert m is not None, detail
        assert float(m.group(2)) - died < 5.0, "noticed too late: " + detail


@pytest.mark.timeout(90)
@pytest.mark.parametrize("how", ["shape", "kind"])
def test_mismatched_calls_across_hosts_raise_on_every_rank(hosts, tmp_path, how):
    """Another shape on one host; or broadcast (which stays on the flat ring)
    on one host where the other calls all_sum (two-level): MismatchError on
    every rank, well before the call's 30 s timeout."""
    start_time = time.monotonic()
    for rank, (code, out, err) in enumerate(run(hosts, [2, 2], tmp_path, "mismatch", how, timeout=60)):
        detail = f"rank {rank}: exit {code}\n{out[-3000:]}\n{err[-3000:]}"
        assert code == 0 and "MISMATCH MismatchError" in out, detail
    assert time.monotonic() - start_time < 25


@pytest.mark.timeout(120)
def test_the_memory_budget_holds(hosts, tmp_path):
    """Beyond its input and output a call may use 64 MiB (here: its shared
    segments, the chunks in flight, the transport's buffers)."""
    for rank, (code, out, err) in enumerate(run(hosts, [2, 2], tmp_path, "memory")):
        detail = f"rank {rank}: exit {code}\n{out[-3000:]}\n{err[-3000:]}"
        assert code == 0, detail
        extra = {op: int(mib) for op, mib in re.findall(r"MEMORY (\w+) (-?\d+)", out)}
        assert set(extra) == {"all_sum", "all_gather", "sum_scatter"}, detail
        assert max(extra.values()) <= 64, detail


@pytest.mark.timeout(180)
def test_the_benchmark_on_simulated_hosts(hosts):
    """python -m aiocomm.bench.hosts makes hosts of its own, measures and removes them."""
    def ours() -> set[str]:
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        return set(re.findall(r"^(aio[0-9a-f]{6}(?:h\d+|sw))\b", listed, re.M))

    before = ours()
    proc = subprocess.run([sys.executable, "-m", "aiocomm.bench.hosts", "--hosts", "2", "--per-host", "2", "--rate",
                           "none", "--sizes", "8,64K", "--iters", "2", "--small-iters", "5",
                           "--peers", "aiocomm,aiocomm-flat"],
                          cwd=ROOT, env=clean_env(PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = re.findall(r"^  (aiocomm(?:-flat)?) +(\d+) .* (yes|NO)$", proc.stdout, re.M)
    assert sorted(rows) == [("aiocomm", "65536", "yes"), ("aiocomm", "8", "yes"),
                            ("aiocomm-flat", "65536", "yes"), ("aiocomm-flat", "8", "yes")], proc.stdout
    assert ours() - before == set(), "the benchmark left namespaces behind"
