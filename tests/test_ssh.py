"""Launching over ssh, against a real OpenSSH server on loopback.

The suite starts sshd on a high port with a throw-away host key and an
authorised key it generates; the job's "hosts" are distinct loopback
addresses (127.0.0.2, 127.0.0.3), so each rank listens on its own host's
address as on a real cluster.
"""

import getpass
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid

import pytest

from .conftest import ROOT, WORKERS, clean_env

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
HOSTS = ["127.0.0.2", "127.0.0.3"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ssh_config(tmp_path_factory):
    if not os.path.exists(SSHD) or not shutil.which("ssh") or not shutil.which("ssh-keygen"):
        pytest.skip("OpenSSH server or client is not installed (apt-get install openssh-server openssh-client)")
    d = tmp_path_factory.mktemp("sshd")
    for name in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True)
    (d / "authorized_keys").write_text((d / "client_key.pub").read_text())
    os.chmod(d / "authorized_keys", 0o600)
    port = _free_port()
    (d / "sshd_config").write_text("\n".join([
        f"Port {port}", *[f"ListenAddress {h}" for h in HOSTS],
        f"HostKey {d / 'host_key'}", f"PidFile {d / 'sshd.pid'}",
        f"AuthorizedKeysFile {d / 'authorized_keys'}",
        "PasswordAuthentication no", "KbdInteractiveAuthentication no", "PubkeyAuthentication yes",
        "UsePAM no", "StrictModes no", "PermitRootLogin yes", "LogLevel ERROR", "",
    ]))
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", exist_ok=True)
    sshd = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection((HOSTS[0], port), timeout=1).close()
            break
        except OSError:
            if sshd.poll() is not None or time.monotonic() > deadline:
                sshd.kill()
                pytest.skip(f"sshd could not start here: {sshd.stderr.read()[-500:] if sshd.stderr else ''}")
            time.sleep(0.05)
    (d / "ssh_config").write_text("\n".join([
        "Host 127.0.0.*", f"  Port {port}", f"  IdentityFile {d / 'client_key'}",
        "  UserKnownHostsFile /dev/null", "  StrictHostKeyChecking no", "  LogLevel ERROR",
        f"  User {getpass.getuser()}", "",
    ]))
    yield d / "ssh_config"
    sshd.terminate()
    sshd.wait(5)


def launch_ssh(cfg, *args, timeout=90):
    cmd = [sys.executable, "-m", "launcher", "--hosts", ",".join(HOSTS), "-n", "2",
           "--ssh", f"ssh -F {cfg}", str(WORKERS / "where.py"), *args]
    return subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=timeout)


def _processes_with(marker: str) -> list[str]:
    out = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if marker in line and "ps -ww" not in line]


@pytest.mark.timeout(120)
def test_ranks_over_ssh_listen_on_their_hosts(ssh_config):
    marker = uuid.uuid4().hex
    proc = launch_ssh(ssh_config, marker)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in range(4):
        host = HOSTS[rank // 2]
        assert f"[rank {rank}] RANK {rank} OF 4 AT {host} SUM 4 {marker}" in proc.stdout, proc.stdout
    assert not _processes_with(marker)


@pytest.mark.timeout(120)
def test_failing_remote_rank_stops_the_job_everywhere(ssh_config):
    marker = uuid.uuid4().hex
    start = time.monotonic()
    proc = launch_ssh(ssh_config, marker, "3", "60")  # rank 3 exits 3, the others would sleep 60 s
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "rank 3 exited with code 3" in proc.stderr
    assert time.monotonic() - start < 40
    time.sleep(1.0)
    assert not _processes_with(marker), _processes_with(marker)


@pytest.mark.timeout(120)
def test_stdin_reaches_a_remote_rank_zero(ssh_config):
    cmd = [sys.executable, "-m", "launcher", "--hosts", HOSTS[0], "-n", "2",
           "--ssh", f"ssh -F {ssh_config}", str(WORKERS / "stdin_echo.py")]
    proc = subprocess.run(cmd, cwd=ROOT, env=clean_env(), input="over ssh\n", capture_output=True, text=True,
                          timeout=90)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[rank 0] GOT over ssh" in proc.stdout


def _ssh_cmd(cfg, script: str, *args: str, hosts=HOSTS, n: int = 2, launcher_args=()) -> list[str]:
    return [sys.executable, "-m", "launcher", "--hosts", ",".join(hosts), "-n", str(n), "--ssh", f"ssh -F {cfg}",
            *launcher_args, str(WORKERS / script), *args]


@pytest.mark.timeout(120)
def test_the_job_token_is_on_no_command_line(ssh_config):
    proc = subprocess.Popen(_ssh_cmd(ssh_config, "launcher_token.py"), cwd=ROOT, env=clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert "TOKEN" in line, proc.stderr.read()[-3000:]
    token = line.split("TOKEN ")[1].strip()
    assert len(token) == 32
    # Every process's command line, while the ssh clients and remote agents run.
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmdline = fh.read()
        except OSError:
            continue
        assert token.encode() not in cmdline, cmdline.replace(b"\0", b" ")[:300]
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]


@pytest.mark.timeout(120)
def test_the_remote_agent_cannot_be_replaced_from_the_working_directory(ssh_config, tmp_path):
    for name in ("launcher.py", "json.py", "subprocess.py", "signal.py", "tempfile.py"):
        (tmp_path / name).write_text("raise SystemExit('HIJACKED')\n")
    (tmp_path / "launcher").mkdir()
    for name in ("__init__.py", "__main__.py", "remote.py", "agent.py"):
        (tmp_path / "launcher" / name).write_text("raise SystemExit('HIJACKED')\n")
    proc = subprocess.run(_ssh_cmd(ssh_config, "where.py", "clean", launcher_args=("--cwd", str(tmp_path))),
                          cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "HIJACKED" not in proc.stdout + proc.stderr
    assert f"[rank 3] RANK 3 OF 4 AT {HOSTS[1]} SUM 4 clean" in proc.stdout


@pytest.mark.timeout(120)
def test_remote_ranks_blame_the_rank_that_failed(ssh_config):
    proc = subprocess.run(_ssh_cmd(ssh_config, "launcher_blame.py", "2"), cwd=ROOT, env=clean_env(),
                          capture_output=True, text=True, timeout=90)
    assert proc.returncode == 7, proc.stderr[-3000:]
    summary = proc.stderr.strip().splitlines()[-1]
    assert "rank 2 exited with code 7 (the cause)" in summary, summary
    assert "failed because of rank 2" in summary, summary  # the remote agents relayed the runtime's records


def _start_sleeping_job(cfg, marker: str) -> subprocess.Popen:
    """Four ranks on the two hosts, each in a 60 s sleep once the job is formed."""
    proc = subprocess.Popen(_ssh_cmd(cfg, "where.py", marker, "-1", "60"), cwd=ROOT, env=clean_env(),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started = 0
    while started < 4:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()[-3000:]
        started += marker in line
    assert len(_processes_with(marker)) >= 4  # the ranks, each with the marker on its command line
    return proc


def _ssh_clients(launcher: int, host: str) -> list[int]:
    """Pids of the launcher's ssh clients to ``host``."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat", "rb") as fh:
                ppid = int(fh.read().rpartition(b")")[2].split()[1])
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                args = fh.read().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == launcher and os.path.basename(args[0]) == b"ssh" and host.encode() in args:
            pids.append(int(pid))
    return pids


def _none_left(marker: str, within: float) -> bool:
    deadline = time.monotonic() + within
    while _processes_with(marker):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


@pytest.mark.timeout(120)
def test_a_remote_rank_stops_when_its_ssh_connection_drops(ssh_config):
    import re
    import signal

    marker = uuid.uuid4().hex
    proc = _start_sleeping_job(ssh_config, marker)
    clients = _ssh_clients(proc.pid, HOSTS[1])
    assert len(clients) == 2, clients
    os.kill(clients[0], signal.SIGKILL)  # the connection drops; only the remote agent can stop that rank now
    _, err = proc.communicate(timeout=60)
    summary = err.strip().splitlines()[-1]
    assert proc.returncode == 128 + signal.SIGKILL, err[-3000:]
    assert re.search(r"rank [23] killed by SIGKILL \(the cause\)", summary), summary
    assert _none_left(marker, 20), _processes_with(marker)


@pytest.mark.timeout(120)
def test_remote_ranks_stop_when_the_launcher_is_killed(ssh_config):
    import signal

    marker = uuid.uuid4().hex
    proc = _start_sleeping_job(ssh_config, marker)
    clients = _ssh_clients(proc.pid, HOSTS[0]) + _ssh_clients(proc.pid, HOSTS[1])
    assert len(clients) == 4, clients
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert _none_left(marker, 20), _processes_with(marker)
    deadline = time.monotonic() + 10
    while any(_ssh_alive(pid) for pid in clients) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_ssh_alive(pid) for pid in clients), "an ssh client outlived the launcher"


def _ssh_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rpartition(b")")[2].split()[0] != b"Z"
    except OSError:
        return False


@pytest.mark.timeout(120)
def test_env_options_and_the_hostfile_reach_remote_ranks(ssh_config):
    proc = subprocess.run(_ssh_cmd(ssh_config, "launcher_env.py", "AIOCOMM_T_A", "AIOCOMM_T_B",
                                   launcher_args=("--env", "AIOCOMM_T_A=over ssh", "--env", "AIOCOMM_T_B=x=y")),
                          cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in range(4):  # the sum proves each rank read the hostfile its agent wrote
        assert f"[rank {rank}] SUM 4" in proc.stdout, proc.stdout
        assert f"[rank {rank}] ENV AIOCOMM_T_A='over ssh'" in proc.stdout, proc.stdout
        assert f"[rank {rank}] ENV AIOCOMM_T_B='x=y'" in proc.stdout, proc.stdout


def _carry_on_cmd(cfg, marker: str, *plan: str, linger: str = "3") -> list[str]:
    return _ssh_cmd(cfg, "launcher_survivors.py", *plan, marker,
                    launcher_args=("--on-failure", "continue", "--env", f"AIOCOMM_TEST_LINGER={linger}"))


@pytest.mark.timeout(120)
def test_a_remote_rank_dies_and_the_others_carry_on(ssh_config):
    marker = uuid.uuid4().hex
    proc = subprocess.run(_carry_on_cmd(ssh_config, marker, "3=kill@0.3"), cwd=ROOT, env=clean_env(),
                          capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (f"aiocomm-launch: rank 3 (host {HOSTS[1]}) was killed by SIGKILL; the other ranks carry on "
            "(--on-failure continue)") in proc.stderr, proc.stderr[-3000:]
    for rank in range(3):  # rank 2 on the same host as the dead rank, its agent and ssh client left alone
        assert f"[rank {rank}] carried on continue" in proc.stdout, proc.stdout
    assert proc.stderr.strip().splitlines()[-1] == ("aiocomm-launch: the job carried on without rank 3 "
                                                    "(killed by SIGKILL); ranks 0, 1, 2 exited 0")
    assert _none_left(marker, 10), _processes_with(marker)


@pytest.mark.timeout(120)
def test_a_host_whose_connection_drops_is_carried_on_without(ssh_config):
    import signal

    marker = uuid.uuid4().hex
    proc = subprocess.Popen(_carry_on_cmd(ssh_config, marker, linger="5"), cwd=ROOT, env=clean_env(),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started = 0
    while started < 4:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()[-3000:]
        started += line.startswith("[rank ") and " pid " in line
    clients = _ssh_clients(proc.pid, HOSTS[1])
    assert len(clients) == 2, clients
    os.kill(clients[0], signal.SIGKILL)  # that rank's agent stops it; the job goes on without it
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    assert re.search(rf"aiocomm-launch: rank [23] \(host {HOSTS[1]}\) was lost: its ssh client was killed by "
                     r"SIGKILL before the rank's end was reported; the other ranks carry on", err), err[-3000:]
    assert out.count("carried on continue") == 3, out
    assert _none_left(marker, 20), _processes_with(marker)
