"""Slurm as it is: srun's tasks find rank 0 from Slurm's own variables.

Three layers: the host-list parser against what ``scontrol show hostnames``
prints (and against scontrol itself where it is installed); ranks started by
hand with the variables srun sets; and, where the machine has Slurm's
daemons and we are root, a private one-node Slurm running ``srun -n 4``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aiocomm.config import (
    SLURM_PORT_BASE,
    SLURM_PORT_SPAN,
    HostlistError,
    expand_hostlist,
    slurm_coordinator,
    slurm_port,
)
from aiocomm.errors import CommError
from aiocomm.rendezvous import coordinator_from_env, join_spec_from_env

from .conftest import ROOT, WORKERS, clean_env

# ---- the host-list parser ------------------------------------------------------------

# What scontrol show hostnames (Slurm 22.05) prints for each.
EXPANSIONS = [
    ("node[01-04,07],gpu3", ["node01", "node02", "node03", "node04", "node07", "gpu3"]),
    ("vm", ["vm"]),
    ("a[1-2]b[3-4]", ["a1b3", "a1b4", "a2b3", "a2b4"]),
    ("a[1-2]b[3-4],c", ["a1b3", "a1b4", "a2b3", "a2b4", "c"]),
    ("a[1,2]b[3,4]c[5-6]", ["a1b3c5", "a1b3c6", "a2b3c5", "a2b3c6", "a1b4c5", "a1b4c6", "a2b4c5", "a2b4c6"]),
    ("a[1-2][3-4]", ["a13", "a14", "a23", "a24"]),
    ("[1-3]", ["1", "2", "3"]),
    ("n[9-11]", ["n9", "n10", "n11"]),
    ("n[08-10]", ["n08", "n09", "n10"]),
    ("n[001-3]", ["n001", "n002", "n003"]),
    ("n[1-003]", ["n1", "n2", "n3"]),
    ("n[99-101]", ["n99", "n100", "n101"]),
    ("n[0099-101]", ["n0099", "n0100", "n0101"]),
    ("n[1-2]b[03-4]", ["n1b03", "n1b04", "n2b03", "n2b04"]),
    ("n[7]", ["n7"]),
    ("n[0-0]", ["n0"]),
    ("n[1-1,1]", ["n1", "n1"]),
    ("a,a", ["a", "a"]),
    ("a b", ["a", "b"]),
    ("a,,b", ["a", "b"]),
    ("n[1-2], m", ["n1", "n2", "m"]),
    ("n1-3", ["n1-3"]),
    ("1.2.3.[4-5]", ["1.2.3.4", "1.2.3.5"]),
    ("rack[1-2]-node[1-2],login", ["rack1-node1", "rack1-node2", "rack2-node1", "rack2-node2", "login"]),
    ("", []),
]

# Text after the last bracket: scontrol 22.05 answers "Invalid hostlist", but
# the meaning is plain and later Slurm tools write such names.
SUFFIXES = [
    ("a-[1-3]b", ["a-1b", "a-2b", "a-3b"]),
    ("n[01-02]x[1,3]y", ["n01x1y", "n01x3y", "n02x1y", "n02x3y"]),
    ("gpu[1-2].cluster.org,cpu1", ["gpu1.cluster.org", "gpu2.cluster.org", "cpu1"]),
]

MALFORMED = ["n[3-1]", "n[10-9]", "n[1-3", "n[x]", "n[1-2]],x", "n[1-2]]", "n]", "n[1-2,]", "n[,1]", "n[-3]",
             "n[1-]", "n[1--3]", "n[1-3:2]", "n[[1]]", "n[ 1-2]"]


@pytest.mark.parametrize("text,hosts", EXPANSIONS + SUFFIXES)
def test_expand_hostlist(text, hosts):
    assert expand_hostlist(text) == hosts


@pytest.mark.parametrize("text", MALFORMED)
def test_malformed_hostlists_are_errors(text):
    with pytest.raises(HostlistError) as info:
        expand_hostlist(text)
    assert isinstance(info.value, ValueError)


def test_large_ranges_keep_their_order():
    hosts = expand_hostlist("c[0001-1000],d[7,3,5]")
    assert hosts[:2] == ["c0001", "c0002"] and hosts[999] == "c1000" and hosts[1000:] == ["d7", "d3", "d5"]


def test_expansion_matches_scontrol(tmp_path):
    """The same answers as the real ``scontrol show hostnames``, where it is installed."""
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        pytest.skip("scontrol is not installed here (Debian: apt-get install slurm-client)")
    conf = tmp_path / "slurm.conf"  # scontrol reads a configuration first, whatever it is asked
    conf.write_text("ClusterName=parse\nSlurmctldHost=localhost\n")
    env = dict(os.environ, SLURM_CONF=str(conf))
    for text, hosts in EXPANSIONS:
        if not text:
            continue
        out = subprocess.run([scontrol, "show", "hostnames", text], env=env, capture_output=True, text=True,
                             timeout=30)
        assert out.stdout.split() == hosts, (text, out.stdout, out.stderr)


# ---- where rank 0 is and which port -----------------------------------------------------


def test_port_from_reserved_ports():
    assert slurm_port({"SLURM_STEP_RESV_PORTS": "12000-12015", "SLURM_JOB_ID": "7"})[0] == 12000
    assert slurm_port({"SLURM_STEP_RESV_PORTS": "12005,12000"})[0] == 12005
    with pytest.raises(CommError, match="SLURM_STEP_RESV_PORTS"):
        slurm_port({"SLURM_STEP_RESV_PORTS": "none"})


def test_port_derived_from_job_and_step():
    def port(job, step):
        return slurm_port({"SLURM_JOB_ID": str(job), "SLURM_STEP_ID": str(step)})[0]

    assert port(1234, 0) == port(1234, 0)  # every task of a step computes the same
    steps = [port(1234, s) for s in range(200)]
    assert len(set(steps)) == 200  # steps of one job side by side never collide
    assert len({port(j, 0) for j in range(1000, 1100)}) == 100  # nor do neighbouring jobs
    big = port(98765432, 4294967294)  # the batch step's id
    assert all(SLURM_PORT_BASE <= p < SLURM_PORT_BASE + SLURM_PORT_SPAN for p in [*steps, big])
    assert slurm_port({"SLURM_JOB_ID": "5"})[0] == port(5, 0)
    assert slurm_port({}) is None
    with pytest.raises(CommError, match="not integers"):
        slurm_port({"SLURM_JOB_ID": "abc"})


SRUN = {"SLURM_PROCID": "1", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "42", "SLURM_STEP_ID": "3",
        "SLURM_STEP_NODELIST": "localhost,127.0.0.[2-3]", "SLURM_JOB_NODELIST": "127.0.0.[2-5]"}


def test_coordinator_is_the_first_node_of_the_step():
    spec = join_spec_from_env(SRUN)
    assert spec is not None and spec.rank == 1 and spec.size == 4
    assert spec.coordinator == ("localhost", slurm_port(SRUN)[0])
    job_only = {k: v for k, v in SRUN.items() if k != "SLURM_STEP_NODELIST"}
    assert coordinator_from_env(job_only, "Slurm", rank_var="SLURM_PROCID")[0] == "127.0.0.2"
    old_name = {**job_only, "SLURM_NODELIST": "localhost"}
    del old_name["SLURM_JOB_NODELIST"]
    assert coordinator_from_env(old_name, "Slurm", rank_var="SLURM_PROCID")[0] == "localhost"
    reserved = {**SRUN, "SLURM_STEP_RESV_PORTS": "45123-45127"}
    assert coordinator_from_env(reserved, "Slurm", rank_var="SLURM_PROCID") == ("localhost", 45123)


def test_explicit_variables_override_slurm():
    assert coordinator_from_env({**SRUN, "AIOCOMM_COORDINATOR": "127.0.0.9:4000"}, "Slurm",
                                rank_var="SLURM_PROCID") == ("127.0.0.9", 4000)
    assert coordinator_from_env({**SRUN, "MASTER_ADDR": "127.0.0.8", "MASTER_PORT": "5000"}, "Slurm",
                                rank_var="SLURM_PROCID") == ("127.0.0.8", 5001)


def test_pmi2_ranks_of_srun_use_slurm_but_mpirun_ranks_do_not():
    pmi = {"PMI_RANK": "1", "PMI_SIZE": "4", "PMI_JOBID": "42.3", **SRUN}
    spec = join_spec_from_env(pmi)
    assert spec is not None and spec.source.startswith("MPICH/Hydra") and spec.coordinator[0] == "localhost"
    # mpirun inside an allocation: its ranks may run off the node list's first node.
    for other in ({**pmi, "PMI_JOBID": "kvs_77_0"},
                  {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "4", **SRUN}):
        with pytest.raises(CommError, match="no coordinator address"):
            join_spec_from_env(other)


def test_without_a_node_list_or_job_the_error_stays():
    with pytest.raises(CommError, match=r"started by Slurm .* set AIOCOMM_COORDINATOR"):
        join_spec_from_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "1"})
    with pytest.raises(CommError, match="no coordinator address"):
        join_spec_from_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_NODELIST": "localhost"})


def test_bad_node_lists_and_unknown_hosts_say_what_to_set():
    with pytest.raises(CommError, match=r"SLURM_STEP_NODELIST.*AIOCOMM_COORDINATOR"):
        slurm_coordinator({**SRUN, "SLURM_STEP_NODELIST": "n[3-1]"})
    with pytest.raises(CommError, match=r"'no-such-node\.invalid'.*does not resolve.*AIOCOMM_COORDINATOR"):
        slurm_coordinator({**SRUN, "SLURM_STEP_NODELIST": "no-such-node.invalid,localhost"})


# ---- ranks started by hand with srun's variables ---------------------------------------------


def _port_free(port: int) -> bool:
    """Nothing listens on it (TIME-WAIT leftovers are fine: the rendezvous and
    Slurm's daemons bind with SO_REUSEADDR)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_job_id(steps: int) -> int:
    """A job id whose derived ports for steps 0..steps-1 are free here."""
    for job in range(int(time.time()) % 100000, 10**7, 7):
        ports = [slurm_port({"SLURM_JOB_ID": str(job), "SLURM_STEP_ID": str(s)})[0] for s in range(steps)]
        if all(_port_free(p) for p in ports):
            return job
    raise RuntimeError("no free derived ports")


def _srun_env(rank: int, n: int, job: int, step: int, nodelist: str, **extra: str) -> dict[str, str]:
    env = clean_env(**extra)
    for key in [k for k in env if k.startswith(("SLURM_", "PMI_"))]:
        del env[key]  # whatever Slurm this test itself runs under
    env.update(SLURM_PROCID=str(rank), SLURM_NTASKS=str(n), SLURM_LOCALID=str(rank), SLURM_NODEID="0",
               SLURM_JOB_ID=str(job), SLURM_STEP_ID=str(step), SLURM_STEP_NODELIST=nodelist,
               SLURM_JOB_NODELIST=nodelist, SLURM_NNODES="1", SLURM_STEP_NUM_TASKS=str(n),
               AIOCOMM_CONNECT_TIMEOUT="20")
    return env


def _start_step(n: int, job: int, step: int, nodelist: str, **extra: str) -> list[subprocess.Popen[str]]:
    return [subprocess.Popen([sys.executable, str(WORKERS / "join_report.py")], cwd=ROOT,
                             env=_srun_env(r, n, job, step, nodelist, **extra),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(n)]


def _check_step(procs: list[subprocess.Popen[str]], n: int) -> None:
    total = n * (n + 1) // 2
    for r, proc in enumerate(procs):
        out, err = proc.communicate(timeout=50)
        assert proc.returncode == 0, err[-3000:]
        assert f"JOINED {r} {n} {total} {list(range(n))}" in out, out + err[-2000:]


@pytest.mark.timeout(90)
def test_simulated_srun_two_steps_of_one_job_side_by_side():
    """Two steps of one job at once, 4 and 3 tasks, ports derived from the ids:
    each forms its own world (a collision would mix or fail them)."""
    job = _free_job_id(2)
    first = _start_step(4, job, 0, "localhost")
    second = _start_step(3, job, 1, "localhost,127.0.0.1")
    _check_step(first, 4)
    _check_step(second, 3)


@pytest.mark.timeout(90)
def test_simulated_srun_with_reserved_ports():
    port = next(p for p in range(45500, 45600) if _port_free(p))
    procs = _start_step(2, 99, 0, "localhost", SLURM_STEP_RESV_PORTS=f"{port}-{port + 2}")
    _check_step(procs, 2)


@pytest.mark.timeout(90)
def test_simulated_srun_coordinator_variable_still_wins():
    """AIOCOMM_COORDINATOR overrides Slurm: the node list here does not even resolve."""
    port = next(p for p in range(45600, 45700) if _port_free(p))
    procs = _start_step(2, 99, 0, "no-such-node.invalid", AIOCOMM_COORDINATOR=f"127.0.0.1:{port}")
    _check_step(procs, 2)


# ---- a real one-node Slurm -------------------------------------------------------------------

SLURM_CONF = """\
ClusterName=aiocommtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType={auth}
CredType={cred}
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
# (srun's reserved ports, below the kernel's ephemeral ones: no outgoing connection can hold one)
MpiParams=ports=21900-21999
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
MailProg=/bin/true
NodeName={host} NodeAddr=127.0.0.1 CPUs=8 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A private Slurm: slurmctld and slurmd for this host, as root, with
    munge when munged is installed (else auth/none), on ports 45817/45818."""
    missing = [tool for tool in ("slurmctld", "slurmd", "srun", "sinfo") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"Slurm is not installed here (no {', '.join(missing)}; Debian: apt-get install slurm-wlm)")
    if os.geteuid() != 0:
        pytest.skip("a private slurmd must run as root")
    host = socket.gethostname()
    try:
        socket.getaddrinfo(host, None)
    except OSError:
        pytest.skip(f"this host's name {host!r} does not resolve")
    if any(not _port_free(p) for p in (45817, 45818)):
        pytest.skip("something listens on port 45817 or 45818 (another Slurm of this test?)")
    d = tmp_path_factory.mktemp("slurm")
    (d / "state").mkdir()
    (d / "spool").mkdir()
    procs: list[subprocess.Popen[bytes]] = []
    auth, cred = "auth/none", "cred/none"
    munged = shutil.which("munged") or ("/usr/sbin/munged" if os.path.exists("/usr/sbin/munged") else None)
    if munged and os.path.exists("/etc/munge/munge.key"):
        sock = d / "munge.socket"
        procs.append(subprocess.Popen([munged, "-F", "--force", f"--socket={sock}", f"--pid-file={d}/munged.pid",
                                       f"--log-file={d}/munged.log", f"--seed-file={d}/munged.seed"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        auth, cred = "auth/munge", "cred/munge"
    text = SLURM_CONF.format(host=host, ctld_port=45817, slurmd_port=45818, auth=auth, cred=cred, dir=d)
    if auth == "auth/munge":
        text += f"AuthInfo=socket={d}/munge.socket\n"
    conf = d / "slurm.conf"
    conf.write_text(text)
    env = dict(os.environ, SLURM_CONF=str(conf))
    try:
        procs.append(subprocess.Popen(["slurmctld", "-D", "-c", "-f", str(conf)], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        procs.append(subprocess.Popen(["slurmd", "-D", "-f", str(conf)], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 40
        state = ""
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in procs):
                break
            state = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True,
                                   timeout=20).stdout.strip()
            if state == "idle":
                break
            time.sleep(0.5)
        if state != "idle":
            logs = "".join((d / name).read_text()[-1500:] for name in ("slurmctld.log", "slurmd.log")
                           if (d / name).exists())
            pytest.fail(f"the private Slurm did not come up (node state {state!r}):\n{logs}")
        yield env
    finally:
        for proc in reversed(procs):
            _stop(proc)


def _client_env(slurm_env: dict[str, str]) -> dict[str, str]:
    """What srun and salloc run with: this Slurm's configuration, this checkout, no outer Slurm or launcher."""
    env = clean_env(**slurm_env)
    for key in [k for k in env if k.startswith(("SLURM_", "PMI_")) and k != "SLURM_CONF"]:
        del env[key]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


@pytest.mark.timeout(240)
def test_real_srun_trains_data_parallel(slurm):
    """The issue's own command: ``srun -n 4 python examples/data_parallel.py``,
    with no aiocomm variable set."""
    proc = subprocess.run(["srun", "-n", "4", sys.executable, "examples/data_parallel.py", "30", "200"], cwd=ROOT,
                          env=_client_env(slurm), capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # one world of 4 (four worlds of one would each print a line of their own)
    trained = [line for line in proc.stdout.splitlines() if line.startswith("trained on ")]
    assert len(trained) == 1 and trained[0].startswith("trained on 4 ranks:"), proc.stdout[-3000:]


@pytest.mark.timeout(240)
def test_real_srun_reserved_ports_and_steps_side_by_side(slurm):
    """Inside one allocation, two steps at once (one with --resv-ports): both form their worlds."""
    worker = str(WORKERS / "join_report.py")
    script = (f"srun -n 2 --resv-ports {sys.executable} {worker} > step0.out & "
              f"srun -n 3 {sys.executable} {worker} > step1.out; wait")
    run = Path(slurm["SLURM_CONF"]).parent / "steps"
    run.mkdir(exist_ok=True)
    alloc = subprocess.run(["salloc", "-n", "5", "bash", "-c", script], cwd=run,
                           env=_client_env(slurm), capture_output=True, text=True, timeout=150)
    assert alloc.returncode == 0, alloc.stdout[-3000:] + alloc.stderr[-3000:]
    for name, n in (("step0.out", 2), ("step1.out", 3)):
        out = (run / name).read_text()
        total = n * (n + 1) // 2
        for r in range(n):
            assert f"JOINED {r} {n} {total} {list(range(n))}" in out, (name, out, alloc.stderr[-2000:])

