"""The local launcher: exit status, stopping the other ranks, output prefixes."""

import os
import re
import time

import pytest

from .conftest import launch


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how,code,summary", [
    ("exit", 3, "rank 1 exited with code 3"),
    ("kill", 128 + 9, "rank 1 killed by SIGKILL"),
])
def test_failing_rank_stops_the_job(how, code, summary):
    start = time.monotonic()
    proc = launch(3, "fail_rank.py", how, timeout=50)
    assert time.monotonic() - start < 30, "the other ranks were not stopped"
    assert proc.returncode == code, proc.stderr
    assert summary in proc.stderr
    pids = [int(p) for p in re.findall(r"pid (\d+)", proc.stdout)]
    assert len(pids) == 3
    time.sleep(0.2)
    assert not any(_alive(p) for p in pids), "a rank outlived the launcher"


@pytest.mark.timeout(60)
def test_output_lines_are_whole_and_prefixed():
    proc = launch(4, "chatty.py")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 800
    for line in lines:
        m = re.fullmatch(r"\[rank (\d)\] line (\d+) from (\d) end", line)
        assert m and m.group(1) == m.group(3), line


@pytest.mark.timeout(60)
def test_no_prefix():
    proc = launch(2, "chatty.py", launcher_args=("--no-prefix",))
    assert proc.returncode == 0
    assert all(line.startswith("line ") for line in proc.stdout.splitlines())


@pytest.mark.timeout(60)
def test_job_timeout():
    start = time.monotonic()
    proc = launch(2, "fail_rank.py", "none", launcher_args=("--timeout", "2"), timeout=50)
    assert proc.returncode == 124 and "timed out" in proc.stderr
    assert time.monotonic() - start < 20


def _run(args, **kw):
    import subprocess
    import sys

    from .conftest import ROOT, clean_env
    return subprocess.run([sys.executable, "-m", "launcher", *args], cwd=ROOT, env=clean_env(),
                          capture_output=True, text=True, timeout=60, **kw)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fmt", ["list", "map"])
def test_mlx_hostfile_formats(tmp_path, fmt):
    from .conftest import WORKERS
    hosts = [{"ssh": "localhost", "ips": ["127.0.0.1"]}, {"ssh": "127.0.0.1"}]
    data = hosts if fmt == "list" else {"backend": "ring", "envs": ["AIOCOMM_TEST_ENV=from-hostfile"], "hosts": hosts}
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(__import__("json").dumps(data))
    proc = _run(["--hostfile", str(hostfile), "-n", "2", str(WORKERS / "where.py")])
    assert proc.returncode == 0, proc.stderr
    assert all(f"[rank {r}] RANK {r} OF 4 AT 127.0.0.1 SUM 4" in proc.stdout for r in range(4)), proc.stdout


@pytest.mark.timeout(60)
def test_starting_port_and_connections_per_ip(tmp_path):
    import socket

    from .conftest import WORKERS
    import random

    def bindable(port: int) -> bool:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
        return True

    # Below the kernel's ephemeral range (32768-60999 by default), so no
    # connection made meanwhile can take one of the six ports.
    base = next(b for b in iter(lambda: random.randrange(20000, 32000), None) if all(map(bindable, range(b, b + 6))))
    proc = _run(["-n", "3", "-p", str(base), "--connections-per-ip", "2", "--output-dir", str(tmp_path / "logs"),
                 str(WORKERS / "where.py")])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""  # everything went to the files
    for r in range(3):
        log = (tmp_path / "logs" / f"rank-{r}.log").read_text()
        assert f"RANK {r} OF 3 AT 127.0.0.1 SUM 3" in log


@pytest.mark.timeout(60)
def test_stdin_goes_to_rank_zero():
    from .conftest import WORKERS
    proc = _run(["-n", "2", str(WORKERS / "stdin_echo.py")], input="hello rank zero\n")
    assert proc.returncode == 0, proc.stderr
    assert "[rank 0] GOT hello rank zero" in proc.stdout


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT", "SIGHUP"])
def test_signal_to_launcher_stops_every_rank(sig):
    import signal
    import subprocess
    import sys
    import uuid

    from .conftest import ROOT, WORKERS, clean_env
    marker = uuid.uuid4().hex
    proc = subprocess.Popen([sys.executable, "-m", "launcher", "-n", "3", str(WORKERS / "where.py"), marker, "-1", "60"],
                            cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    out = ""
    while out.count(marker) < 3 and time.monotonic() < deadline:
        out += proc.stdout.readline()
    proc.send_signal(getattr(signal, sig))
    proc.wait(timeout=20)
    assert proc.returncode != 0
    time.sleep(0.5)
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert marker not in ps.replace(f"ps -eo args", "")


def test_cpu_sets_policies():
    from aiocomm.placement import cpu_sets

    assert cpu_sets(2, "auto", [0, 1]) == [(0,), (1,)]
    assert cpu_sets(2, "auto", [0, 1, 2, 3, 4]) == [(0, 1), (2, 3)]
    # More ranks than CPUs: consecutive ranks (ring neighbours) share one.
    assert cpu_sets(4, "auto", [0, 1]) == [(0,), (0,), (1,), (1,)]
    assert cpu_sets(3, "core", [4, 6]) == [(4,), (4,), (6,)]
    assert cpu_sets(1, "auto", [0, 1]) == [None]
    assert cpu_sets(1, "core", [0, 1]) == [(0, 1)]
    assert cpu_sets(4, "none", [0, 1]) == [None] * 4
    with pytest.raises(ValueError, match="--bind-to 'socket'"):
        cpu_sets(2, "socket", [0, 1])


def test_batch_scheduling_policies():
    from aiocomm.placement import batch_scheduled

    if not hasattr(os, "SCHED_BATCH"):
        pytest.skip("needs Linux scheduling policies")
    assert batch_scheduled(4, "auto", [0, 1])  # ranks outnumber CPUs
    assert not batch_scheduled(2, "auto", [0, 1])
    assert batch_scheduled(1, "batch", [0, 1]) and not batch_scheduled(8, "normal", [0])
    with pytest.raises(ValueError, match="--sched 'fifo'"):
        batch_scheduled(2, "fifo")


@pytest.mark.timeout(60)
@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs Linux and at least 2 usable CPUs")
@pytest.mark.parametrize("bind", ["auto", "none"])
def test_ranks_are_bound_to_cpus(bind):
    from aiocomm.placement import cpu_sets

    proc = launch(2, "affinity.py", launcher_args=("--bind-to", bind))
    assert proc.returncode == 0, proc.stderr
    seen = dict(re.findall(r"\[rank (\d)\] cpus (\S+)", proc.stdout))
    mine = sorted(os.sched_getaffinity(0))
    for rank, want in enumerate(cpu_sets(2, bind, mine)):
        assert seen[str(rank)] == ",".join(map(str, want or mine)), proc.stdout


@pytest.mark.timeout(60)
@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="needs Linux scheduling policies")
@pytest.mark.parametrize("sched", ["auto", "normal", "batch"])
def test_oversubscribed_ranks_run_under_sched_batch(sched):
    from aiocomm.placement import batch_scheduled

    n = len(os.sched_getaffinity(0)) + 1  # one rank more than CPUs
    proc = launch(n, "affinity.py", launcher_args=("--sched", sched))
    assert proc.returncode == 0, proc.stderr
    seen = re.findall(r"\[rank \d+\] batch (\w+)", proc.stdout)
    assert seen == [str(batch_scheduled(n, sched))] * n, proc.stdout


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="needs Linux scheduling policies")
def test_spawning_thread_gets_its_policy_back():
    from launcher.job import _placed

    before = os.sched_getscheduler(0)
    with _placed(None, True):
        assert os.sched_getscheduler(0) == os.SCHED_BATCH
    assert os.sched_getscheduler(0) == before


# --- the pure parts: blame and rendering ----------------------------------------------------


def _outcomes(*specs):
    from launcher.blame import RankOutcome

    out = {}
    for rank, (code, stopped, culprit, ended) in enumerate(specs):
        records = [] if culprit == "none" else [{"rank": rank, "error": "PeerLostError", "culprit": culprit,
                                                 "message": "lost"}]
        out[rank] = RankOutcome(rank, code, stopped, records, ended)
    return out


def test_blame_follows_culprits_to_the_rank_that_failed_on_its_own():
    from launcher.blame import decide, summary

    # rank 2 blames 0, which blames 1; rank 1 failed with no record (SystemExit(7)); victims ended first.
    outcomes = _outcomes((1, False, 1, 1.0), (7, False, "none", 3.0), (1, False, 0, 0.5), (-15, True, "none", 4.0))
    verdict = decide(outcomes)
    assert (verdict.cause, verdict.status, verdict.victims) == (1, 7, {0: 1, 2: 1})
    assert summary(outcomes, verdict) == ("rank 1 exited with code 7 (the cause); ranks 0, 2 failed because of "
                                          "rank 1; rank 3 stopped by the launcher")


def test_blame_never_falls_on_a_rank_the_launcher_stopped():
    from launcher.blame import decide

    # rank 0 timed out waiting for rank 1 (hung; stopped by the launcher): rank 0 is the cause.
    verdict = decide(_outcomes((1, False, 1, 1.0), (-15, True, "none", 3.0)))
    assert (verdict.cause, verdict.status) == (0, 1)
    # a rank that blames itself, or a rank out of range, blames nobody else
    verdict = decide(_outcomes((1, False, 0, 1.0), (2, False, 9, 0.5)))
    assert (verdict.cause, verdict.status, verdict.others) == (1, 2, [0])


def test_blame_a_rank_that_left_early_and_cycles():
    from launcher.blame import decide, summary

    outcomes = _outcomes((1, False, 1, 1.0), (0, False, "none", 0.5))  # rank 1 exited 0 while rank 0 needed it
    verdict = decide(outcomes)
    assert (verdict.cause, verdict.status) == (1, 1)
    assert "rank 1 exited with code 0 while other ranks still needed it (the cause)" in summary(outcomes, verdict)
    verdict = decide(_outcomes((1, False, 1, 2.0), (3, False, 0, 1.0)))  # each blames the other
    assert verdict.cause in (0, 1) and verdict.status in (1, 3)
    signal_death = _outcomes((0, False, "none", 1.0), (-9, False, "none", 1.0))
    assert decide(signal_death).status == 137
    assert "rank 1 killed by SIGKILL (the cause)" in summary(signal_death, decide(signal_death))


def _render(chunks, *, tty=False, raw=False):
    import asyncio

    from launcher.output import Console, RankText

    async def go():
        r, w = os.pipe()
        console = Console(w, asyncio.get_running_loop(), tty=tty, raw=raw)
        reports = []
        texts = {rank: RankText(rank, console, b"\x1eM", reports.append) for rank in (0, 1)}
        for rank, data in chunks:
            texts[rank].feed(data)
        for text in texts.values():
            text.finish()
        await asyncio.to_thread(console.close)
        os.close(w)
        with os.fdopen(r, "rb") as fh:
            return fh.read(), reports

    return asyncio.run(go())


def test_lines_are_whole_and_carriage_returns_render_as_a_terminal_would():
    out, reports = _render([(0, b"half "), (1, b"one\r\n"), (0, b"line\n\x1eM {\"exit\": 0}\nlast"),
                            (1, b"\r 10%\r 20%\r100%"), (1, b"\n")])
    assert out == b"[rank 1] one\n[rank 0] half line\n[rank 1] 100%\n[rank 0] last\n"
    assert reports == [b' {"exit": 0}']
    out, _ = _render([(0, b"a\r\nb\rc"), (1, b"x" * 10)], raw=True)  # log files: the bytes as they came
    assert out == b"a\r\nb\rcxxxxxxxxxx"
    out, _ = _render([(0, b"\r 10%"), (1, b"note\n"), (0, b"\r 50%\r100%\n")], tty=True)
    assert out == b"\r\x1b[K[rank 0]  10%" + b"\r\x1b[K[rank 1] note\n[rank 0]  10%" + b"\r\x1b[K[rank 0] 100%\n"
