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
    except (FileNotFoundError, ProcessLookupError):  # (it ended between the two looks)
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
    import random
    import socket

    from .conftest import WORKERS

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
    proc = subprocess.Popen([sys.executable, "-m", "launcher", "-n", "3", str(WORKERS / "where.py"), marker, "-1",
                             "60"],
                            cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    out = ""
    while out.count(marker) < 3 and time.monotonic() < deadline:
        out += proc.stdout.readline()
    assert out.count(marker) == 3, out  # every rank has started (and is now in its 60 s sleep)
    ps = subprocess.run(["ps", "-ww", "-eo", "args"], capture_output=True, text=True).stdout
    ranks = [line for line in ps.splitlines() if marker in line and "-m launcher" not in line]
    assert len(ranks) == 3, ps  # so the check below can see a rank left behind
    proc.send_signal(getattr(signal, sig))
    proc.wait(timeout=20)
    err = proc.stderr.read()
    assert proc.returncode == 128 + getattr(signal, sig), err[-2000:]
    assert f"the launcher got {sig}" in err, err[-2000:]
    time.sleep(0.5)
    ps = subprocess.run(["ps", "-ww", "-eo", "args"], capture_output=True, text=True).stdout
    assert marker not in ps.replace("ps -ww -eo args", "")


def test_cpu_sets_policies():
    from launcher.placement import cpu_sets

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
    from launcher.placement import batch_scheduled

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
    from launcher.placement import cpu_sets

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
    from launcher.placement import batch_scheduled

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


# --- issue 12: blame, pipes, grandchildren, leaks, progress bars -----------------------------


def _launcher_cmd(*args: str) -> list[str]:
    import sys

    return [sys.executable, "-m", "launcher", *args]


def _gone(pids, within: float) -> bool:
    deadline = time.monotonic() + within
    while any(_alive(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.mark.timeout(60)
@pytest.mark.parametrize("culprit", [1, 2])
def test_the_rank_that_failed_is_blamed_not_its_victims(culprit):
    # The victims (PeerLostError) often exit before the culprit has finished
    # exiting; the job's status is still the culprit's, every time.
    for _ in range(2):
        proc = launch(3, "launcher_blame.py", str(culprit), timeout=50)
        assert proc.returncode == 7, proc.stderr[-3000:]
        summary = proc.stderr.strip().splitlines()[-1]
        assert f"rank {culprit} exited with code 7 (the cause)" in summary, summary
        assert "killed by SIGTERM" not in summary, summary  # ranks the launcher stopped are not failures


@pytest.mark.timeout(60)
def test_a_reader_that_goes_away_ends_the_job():
    import subprocess

    from .conftest import ROOT, WORKERS, clean_env
    cmd = " ".join(_launcher_cmd("-n", "2", str(WORKERS / "launcher_chatty.py")))
    start = time.monotonic()
    proc = subprocess.run(["bash", "-c", f"{cmd} | head -2; echo status ${{PIPESTATUS[0]}} >&2"], cwd=ROOT,
                          env=clean_env(), capture_output=True, text=True, timeout=50)
    assert time.monotonic() - start < 20
    assert len(proc.stdout.splitlines()) == 2
    assert "status 141" in proc.stderr, proc.stderr[-2000:]
    assert "stdout was closed" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.timeout(60)
def test_no_byte_is_lost_to_a_slow_reader_whatever_the_buffering():
    # Unbuffered Python I/O, and a pipe whose other users made it non-blocking
    # (the flag belongs to the pipe, not to one process): writes come back short.
    import subprocess

    from .conftest import ROOT, WORKERS, clean_env
    r, w = os.pipe()
    os.set_blocking(w, False)
    proc = subprocess.Popen(_launcher_cmd("-n", "2", str(WORKERS / "launcher_long_lines.py")), cwd=ROOT,
                            env=clean_env(PYTHONUNBUFFERED="1"), stdout=w, stderr=subprocess.PIPE)
    os.close(w)
    chunks = []
    for _ in range(50):  # a slow reader first: small reads with pauses
        chunks.append(os.read(r, 1000))
        time.sleep(0.01)
    while data := os.read(r, 1 << 20):
        chunks.append(data)
    os.close(r)
    err = proc.stderr.read()
    assert proc.wait(30) == 0, err[-2000:]
    lines = b"".join(chunks).splitlines()
    assert len(lines) == 12, [line[:40] for line in lines]
    sizes = [5000, 70_000, 300_000, 4097, 1_000_000, 12_345]
    for rank in range(2):
        mine = [line for line in lines if line.startswith(b"[rank %d] " % rank)]
        want = [b"[rank %d] rank %d line %d " % (rank, rank, i) + b"x" * n + b" end" for i, n in enumerate(sizes)]
        assert mine == want


@pytest.mark.timeout(60)
def test_a_detached_grandchild_neither_holds_the_job_nor_outlives_it():
    import subprocess
    import uuid

    marker = uuid.uuid4().hex
    start = time.monotonic()
    proc = launch(2, "launcher_detach.py", marker, launcher_args=("--timeout", "30"), timeout=50)
    assert time.monotonic() - start < 15, "the launcher waited for the detached process"
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "[rank 0] done" in proc.stdout and "[rank 1] done" in proc.stdout
    time.sleep(0.3)
    ps = subprocess.run(["ps", "-ww", "-eo", "args"], capture_output=True, text=True).stdout
    assert marker not in ps, "the detached process outlived the job"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", [(), ("--on-failure", "continue")], ids=["stop", "continue"])
def test_ranks_die_with_a_killed_launcher(mode):
    """Also when the job would carry on after a rank's death: the launcher's
    own death is not a rank's."""
    import signal
    import subprocess

    from .conftest import ROOT, WORKERS, clean_env
    proc = subprocess.Popen(_launcher_cmd("-n", "3", *mode, str(WORKERS / "launcher_sleep.py")), cwd=ROOT,
                            env=clean_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    pids = []
    while len(pids) < 3:
        line = proc.stdout.readline()
        assert line, "the launcher ended early"
        pids += [int(p) for p in re.findall(r"pid (\d+)", line)]
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert _gone(pids, 15), "ranks outlived a launcher killed by SIGKILL"


@pytest.mark.timeout(60)
def test_each_rank_holds_only_its_own_listening_sockets_and_closed_stdin_reads_as_eof():
    import subprocess

    from .conftest import ROOT, WORKERS, clean_env
    cmd = " ".join(_launcher_cmd("-n", "3", "--connections-per-ip", "2", str(WORKERS / "launcher_sleep.py"), "0"))
    proc = subprocess.run(["bash", "-c", f"exec {cmd} <&-"], cwd=ROOT, env=clean_env(), capture_output=True,
                          text=True, timeout=50)
    assert proc.returncode == 0, proc.stderr[-2000:]
    seen = re.findall(r"\[rank (\d)\] pid \d+ listening \[([\d, ]*)\] mine \[([\d, ]*)\]", proc.stdout)
    assert len(seen) == 3, proc.stdout
    for _rank, listening, mine in seen:
        assert listening == mine and len(mine.split(",")) == 2, proc.stdout
    assert "[rank 0] stdin ''" in proc.stdout, proc.stdout


@pytest.mark.timeout(60)
def test_progress_bars_render_per_rank_in_a_pipe():
    proc = launch(2, "launcher_progress.py")
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr
    for rank in range(2):
        bars = [line for line in proc.stderr.splitlines() if line.startswith(f"[rank {rank}] progress")]
        assert bars == [f"[rank {rank}] progress 100%|{'#' * 20}|"], proc.stderr
        assert f"[rank {rank}] before {rank}" in proc.stdout and f"[rank {rank}] after {rank}" in proc.stdout


@pytest.mark.timeout(60)
def test_progress_bars_are_drawn_in_place_on_a_terminal():
    import pty
    import subprocess

    from .conftest import ROOT, WORKERS, clean_env
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(_launcher_cmd("-n", "1", str(WORKERS / "launcher_progress.py")), cwd=ROOT,
                            env=clean_env(), stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal)
    os.close(terminal)
    out = b""
    while True:
        try:
            data = os.read(controller, 65536)
        except OSError:  # EIO: the launcher closed the terminal
            break
        if not data:
            break
        out += data
    os.close(controller)
    assert proc.wait(30) == 0
    assert b"\r\x1b[K[rank 0] progress  50%|" + b"#" * 10 in out
    screen = out.replace(b"\r\n", b"\n")
    # What stays on the screen: each line once, the bar in its final state.
    final = [line.rpartition(b"\r\x1b[K")[2] for line in screen.split(b"\n") if line]
    assert final == [b"[rank 0] before 0", b"[rank 0] progress 100%|" + b"#" * 20 + b"|", b"[rank 0] after 0"], out


@pytest.mark.timeout(60)
def test_a_missing_script_is_reported_once_up_front():
    proc = _run(["-n", "3", "no_such_script.py"])
    assert proc.returncode == 2
    assert proc.stderr.count("no_such_script.py") == 1, proc.stderr
    assert "[rank" not in proc.stderr + proc.stdout
    proc = _run(["-n", "3", "--", "no-such-program-anywhere", "x"])
    assert proc.returncode == 127
    assert proc.stderr.count("no-such-program-anywhere") == 1, proc.stderr


@pytest.mark.timeout(60)
def test_the_agent_cannot_be_replaced_from_the_working_directory(tmp_path):
    from .conftest import WORKERS
    for name in ("launcher.py", "json.py", "subprocess.py", "signal.py", "tempfile.py"):
        (tmp_path / name).write_text("raise SystemExit('HIJACKED')\n")
    (tmp_path / "launcher").mkdir()
    for name in ("__init__.py", "__main__.py", "remote.py", "agent.py"):
        (tmp_path / "launcher" / name).write_text("raise SystemExit('HIJACKED')\n")
    import subprocess
    import sys

    from .conftest import ROOT, clean_env
    # The user's directory is the launcher's and the ranks' working directory.
    run_launcher = f"import sys; sys.path.insert(0, {str(ROOT)!r}); from launcher.cli import main; sys.exit(main())"
    proc = subprocess.run([sys.executable, "-I", "-c", run_launcher, "-n", "2", str(WORKERS / "where.py"), "clean"],
                          cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=50)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "HIJACKED" not in proc.stdout + proc.stderr
    assert "[rank 1] RANK 1 OF 2 AT 127.0.0.1 SUM 2 clean" in proc.stdout


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


# --- issue 27: day-one papercuts ----------------------------------------------------------------


def _bindable(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a TIME-WAIT left by an earlier job is no owner
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _fixed_ports(count: int) -> int:
    """A base port in 47000-47999 (the range these tests may use) with ``count`` ports free from it."""
    import random

    return next(b for b in iter(lambda: random.randrange(47000, 48000 - count), None)
                if all(map(_bindable, range(b, b + count))))


@pytest.mark.timeout(120)
def test_the_same_fixed_port_twice_in_a_row():
    # The first job's connections linger in TIME-WAIT on the ranks' ports; nothing listens there.
    from .conftest import WORKERS, assert_ok

    base = _fixed_ports(2)
    for _ in range(3):
        proc = _run(["-p", str(base), "-n", "2", "python", str(WORKERS / "launcher_env.py")])
        assert_ok(proc, 2, "SUM 2")


@pytest.mark.timeout(60)
def test_a_fixed_port_another_program_listens_on_is_named():
    import socket

    from .conftest import WORKERS

    base = _fixed_ports(2)
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # even a listener that allows reuse
        holder.bind(("127.0.0.1", base + 1))
        holder.listen()
        proc = _run(["-p", str(base), "-n", "2", "python", str(WORKERS / "launcher_env.py")])
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip() == f"aiocomm-launch: cannot listen on 127.0.0.1:{base + 1}: [Errno 98] Address " \
                                  "already in use", proc.stderr
    assert "[rank" not in proc.stdout + proc.stderr


def _start_interrupt_job(mode: str, folder, n: int = 2, *launcher_args: str, init: bool = False, env=None):
    """Start ``launcher_interrupt.py`` ranks (joined to a world with
    ``init``; ``env`` added to a clean one); returns the launcher and the
    ranks' pids once all are ready."""
    import subprocess

    from .conftest import ROOT, WORKERS, clean_env
    proc = subprocess.Popen(_launcher_cmd("-n", str(n), *launcher_args, str(WORKERS / "launcher_interrupt.py"), mode,
                                          str(folder), *(["--init"] if init else [])),
                            cwd=ROOT, env=clean_env(**(env or {})), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    pids = []
    while len(pids) < n:
        line = proc.stdout.readline()
        assert line, f"the launcher ended early: {proc.stderr.read()[-2000:]}"
        pids += [int(p) for p in re.findall(r"ready pid (\d+)", line)]
    return proc, pids


@pytest.mark.timeout(60)
def test_ctrl_c_lets_every_rank_run_its_finally(tmp_path):
    import signal

    proc, pids = _start_interrupt_job("finally", tmp_path, n=3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGINT, err[-2000:]
    assert out.count("interrupted") == 3, out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank-0", "rank-1", "rank-2"], (out, err[-2000:])
    assert all(p.read_text() == "saved" for p in tmp_path.iterdir())
    assert _gone(pids, 5)


@pytest.mark.timeout(60)
def test_a_second_ctrl_c_stops_everything_at_once(tmp_path):

    proc, pids = _start_interrupt_job("stubborn", tmp_path)
    _check_second_ctrl_c(proc, pids, stops_within=3, gone_within=2)


def _check_second_ctrl_c(proc, pids, stops_within: float, gone_within: float) -> None:
    """A first Ctrl-C to a job of two ``stubborn`` ranks leaves them running;
    a second one stops the job at once."""
    import signal

    proc.send_signal(signal.SIGINT)
    seen = 0
    while seen < 2:  # each rank got the first Ctrl-C and now ignores SIGINT and SIGTERM
        line = proc.stdout.readline()
        assert line, proc.stderr.read()[-2000:]
        seen += "interrupted" in line
    time.sleep(0.3)
    assert all(_alive(p) for p in pids), "the ranks were not given time after the first Ctrl-C"
    start = time.monotonic()
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=30)
    assert time.monotonic() - start < stops_within, "a second Ctrl-C did not stop the job at once"
    assert proc.returncode == 128 + signal.SIGINT
    assert _gone(pids, gone_within), "a rank outlived the second Ctrl-C"


@pytest.mark.timeout(60)
def test_a_rank_that_ignores_ctrl_c_gets_sigterm_after_the_grace(tmp_path):
    """After --interrupt-grace (2 s here; 10 s by default), not before."""
    import signal
    import subprocess

    from launcher.cli import build_parser
    from launcher.job import INTERRUPT_GRACE

    assert build_parser().parse_args(["-n", "2", "x"]).interrupt_grace == INTERRUPT_GRACE == 10.0
    from .conftest import ROOT, clean_env
    bad = subprocess.run(_launcher_cmd("-n", "1", "--interrupt-grace", "-1", "true"), cwd=ROOT, env=clean_env(),
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 1 and "--interrupt-grace -1: give 0 or more seconds" in bad.stderr, bad.stderr
    grace = 2.0
    proc, pids = _start_interrupt_job("ignore", tmp_path, 2, "--interrupt-grace", str(grace))
    start = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=grace + 30)
    took = time.monotonic() - start
    assert proc.returncode == 128 + signal.SIGINT, err[-2000:]
    assert out.count("got SIGTERM") == 2, out
    assert grace - 0.5 < took < grace + 4, took
    assert _gone(pids, 2)


def _processes_with_env(entry: str) -> list[int]:
    """Pids of the processes whose environment holds ``entry`` (``KEY=VALUE``)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                if entry.encode() in fh.read().split(b"\0") and _alive(int(pid)):
                    found.append(int(pid))
        except OSError:
            continue
    return found


@pytest.mark.timeout(60)
def test_a_killed_launcher_leaves_no_file_and_no_process(tmp_path):
    import subprocess

    from .conftest import ROOT, WORKERS, clean_env
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = subprocess.Popen(_launcher_cmd("-n", "3", str(WORKERS / "launcher_env.py"), "--sleep", "60"),
                            cwd=ROOT, env=clean_env(TMPDIR=str(tmp)), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, text=True)
    pids = []
    while len(pids) < 3:  # every rank has read the hostfile and formed the world
        line = proc.stdout.readline()
        assert line, "the launcher ended early"
        pids += [int(p) for p in re.findall(r"SUM 3 pid (\d+)", line)]
    assert _processes_with_env(f"TMPDIR={tmp}")
    proc.kill()
    proc.wait(10)
    assert _gone(pids, 15), "ranks outlived a launcher killed by SIGKILL"
    deadline = time.monotonic() + 15
    while _processes_with_env(f"TMPDIR={tmp}") and time.monotonic() < deadline:  # the agents finish clearing up
        time.sleep(0.05)
    assert not _processes_with_env(f"TMPDIR={tmp}"), "a process of the job outlived its launcher"
    assert sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*")) == [], "the job left files behind"


@pytest.mark.timeout(60)
def test_env_options_reach_every_rank():
    from .conftest import WORKERS, assert_ok

    proc = _run(["-n", "2", "--env", "AIOCOMM_T_A=one", "--env", "AIOCOMM_T_B=two words=and more", "--env",
                 "AIOCOMM_T_EMPTY=", str(WORKERS / "launcher_env.py"), "AIOCOMM_T_A", "AIOCOMM_T_B",
                 "AIOCOMM_T_EMPTY", "AIOCOMM_T_UNSET"])
    assert_ok(proc, 2, "SUM 2")
    for rank in range(2):
        for seen in ("AIOCOMM_T_A='one'", "AIOCOMM_T_B='two words=and more'", "AIOCOMM_T_EMPTY=''",
                     "AIOCOMM_T_UNSET='<unset>'"):
            assert f"[rank {rank}] ENV {seen}" in proc.stdout, proc.stdout
    proc = _run(["-n", "2", "--env", "NO_VALUE", str(WORKERS / "launcher_env.py")])
    assert proc.returncode != 0 and "--env 'NO_VALUE' is not KEY=VALUE" in proc.stderr, proc.stderr
    assert "[rank" not in proc.stdout + proc.stderr


@pytest.mark.timeout(60)
def test_hostfile_envs_reach_every_rank_and_env_options_win(tmp_path):
    import json

    from .conftest import WORKERS, assert_ok

    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps({"backend": "ring", "envs": ["AIOCOMM_T_A=from-hostfile",
                                                                "AIOCOMM_T_B=from-hostfile"],
                                    "hosts": [{"ssh": "localhost", "ips": ["127.0.0.1"]}, {"ssh": "127.0.0.1"}]}))
    proc = _run(["--hostfile", str(hostfile), "-n", "2", "--env", "AIOCOMM_T_B=from-option",
                 str(WORKERS / "launcher_env.py"), "AIOCOMM_T_A", "AIOCOMM_T_B"])
    assert_ok(proc, 4, "SUM 4")
    for rank in range(4):
        assert f"[rank {rank}] ENV AIOCOMM_T_A='from-hostfile'" in proc.stdout, proc.stdout
        assert f"[rank {rank}] ENV AIOCOMM_T_B='from-option'" in proc.stdout, proc.stdout


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["console script", "python -m aiocomm_launch"])
def test_the_installed_launcher_runs_from_any_directory(tmp_path, how):
    # As installed (pip install -e '.[test]'), not the repository's launcher/ folder: run from
    # elsewhere, with nothing of the repository on the module path.
    import importlib.metadata
    import subprocess
    import sys
    from pathlib import Path

    from .conftest import WORKERS, assert_ok, clean_env
    try:
        importlib.metadata.distribution("aiocomm")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("aiocomm is not installed (pip install -e '.[test]')")
    script = Path(sys.executable).parent / "aiocomm-launch"
    cmd = [str(script)] if how == "console script" else [sys.executable, "-m", "aiocomm_launch"]
    if how == "console script":
        assert script.is_file() and os.access(script, os.X_OK), f"no console script {script}"
    env = clean_env()
    env.pop("PYTHONPATH", None)
    (tmp_path / "launcher").mkdir()  # a user's own launcher/ folder here is not the installed launcher
    (tmp_path / "launcher" / "__init__.py").write_text("raise SystemExit('WRONG LAUNCHER')\n")
    proc = subprocess.run([*cmd, "-n", "2", "python", str(WORKERS / "launcher_env.py"), "AIOCOMM_RANK"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=90)
    assert_ok(proc, 2, "SUM 2")
    for rank in range(2):
        assert f"[rank {rank}] ENV AIOCOMM_RANK='{rank}'" in proc.stdout, proc.stdout
    assert "WRONG LAUNCHER" not in proc.stdout + proc.stderr
