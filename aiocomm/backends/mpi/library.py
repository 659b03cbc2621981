"""The MPI library and this process's life with it: finding it, starting it,
translating its errors, and ending it at exit.

mpi4py is told not to finalize MPI (``mpi4py.rc.finalize``): aiocomm does,
in :func:`_finalize`, after the hooks registered with :func:`before_finalize`
(the exit notices, the operations this rank gave up on), and never in a
forked child or a rank that is failing -- ``MPI_Finalize`` would wait for
ranks that wait for this one, while a rank that exits without it makes
mpirun end the job at once, naming it.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from typing import Any, NoReturn

from ...errors import CommError

#: Environment variables an MPI launcher sets (Open MPI, MPICH/Hydra, PMIx).
MPI_LAUNCHER_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")

lock = threading.Lock()  # guards the module-level singletons of this package

_MPI: Any = None
_present: bool | None = None
_why_unavailable = ""


def present() -> bool:
    """Whether mpi4py is installed and an MPI library can be found, checked
    without importing ``mpi4py.MPI`` (importing it would start MPI, or, told
    not to, leave the program's own mpi4py uninitialised)."""
    global _present
    if _present is None:
        import ctypes.util
        import importlib.util

        global _why_unavailable
        if importlib.util.find_spec("mpi4py") is None:
            _why_unavailable = "mpi4py is not installed; pip install 'aiocomm[mpi]'"
            _present = False
        elif "mpi4py.MPI" not in sys.modules and ctypes.util.find_library("mpi") is None:
            _why_unavailable = "mpi4py is installed but no MPI library (libmpi) was found"
            _present = False
        else:
            _present = True
    return _present


def load() -> Any:
    """The ``mpi4py.MPI`` module (which starts MPI, as mpi4py does on import,
    with MPI_THREAD_MULTIPLE), or None."""
    global _MPI, _why_unavailable
    if _MPI is not None:
        return _MPI
    if not present():
        return None
    import mpi4py

    if "mpi4py.MPI" not in sys.modules:
        mpi4py.rc.finalize = False  # aiocomm finalizes (see _finalize): never in a forked child or a failed rank
    try:
        from mpi4py import MPI
    except Exception as exc:  # the MPI library itself could not be loaded
        _why_unavailable = f"mpi4py could not load an MPI library: {exc}"
        return None
    _MPI = MPI
    return MPI


def why_unavailable() -> str:
    present()
    return _why_unavailable


def started_by_mpi_launcher(environ: Any = None) -> bool:
    env = os.environ if environ is None else environ
    return any(var in env for var in MPI_LAUNCHER_VARS)


def duplicate_world(MPI: Any) -> Any:
    """COMM_WORLD duplicated, errors returned, MPI initialised first if need
    be (and finalized at exit by :func:`_finalize`)."""
    global _owner_pid
    if not MPI.Is_initialized():
        MPI.Init_thread(MPI.THREAD_MULTIPLE)
    if _owner_pid is None:
        _owner_pid = os.getpid()
        import atexit

        atexit.register(_finalize, MPI)
        _watch_failures()
    check_thread_level(MPI)  # (after the exit is arranged: a refused rank still finalizes)
    comm = MPI.COMM_WORLD.Dup()
    comm.Set_errhandler(MPI.ERRORS_RETURN)
    return comm


def check_thread_level(MPI: Any) -> None:
    """Raise ``RuntimeError`` unless MPI runs with ``MPI_THREAD_MULTIPLE``.

    Programs may call aiocomm from any thread, one call at a time per group
    (``MPI_THREAD_SERIALIZED`` for them), but the backend's own threads (the
    async face's progress thread, a group's worker for large collectives,
    the notices) call MPI beside the caller's thread, which only
    ``MPI_THREAD_MULTIPLE`` allows.
    """
    provided = MPI.Query_thread()
    if provided >= MPI.THREAD_MULTIPLE:
        return
    names = {MPI.THREAD_SINGLE: "MPI_THREAD_SINGLE", MPI.THREAD_FUNNELED: "MPI_THREAD_FUNNELED",
             MPI.THREAD_SERIALIZED: "MPI_THREAD_SERIALIZED"}
    raise RuntimeError(
        f"aiocomm's MPI backend needs MPI_THREAD_MULTIPLE, but MPI was initialised with "
        f"{names.get(provided, provided)}: any thread of the program may call aiocomm (one call at a time per "
        "group, MPI_THREAD_SERIALIZED for the program), and the backend's own progress and worker threads call "
        "MPI beside it. Let mpi4py ask for it (do not set mpi4py.rc.thread_level, or set it to 'multiple' before "
        "importing mpi4py.MPI), or use an MPI library built with thread support (Open MPI and MPICH are)."
    )


def owner() -> bool:
    """Whether this process started MPI (a forked child did not)."""
    return os.getpid() == _owner_pid


_owner_pid: int | None = None  # the process that started MPI (a forked child must not finalize it)
_failing = False  # an uncaught exception is ending this process
finalizing = False  # MPI is being finalized: no more MPI calls
_before: list[Callable[[Any], bool]] = []


def before_finalize(hook: Callable[[Any], bool]) -> None:
    """Run ``hook(MPI)`` at a normal exit, before MPI is finalized; a hook
    that returns False makes the exit abort the job instead (it found an
    operation MPI would wait for forever)."""
    _before.append(hook)


def _watch_failures() -> None:
    """Note an uncaught exception (in any thread), or ``sys.exit(n)`` with
    a failing status, so that the exit does not finalize."""
    previous = sys.excepthook
    real_exit = sys.exit

    def hook(kind: type[BaseException], exc: BaseException, tb: Any) -> None:
        global _failing
        if not issubclass(kind, SystemExit):
            _failing = True
        previous(kind, exc, tb)

    def exit(status: str | int | None = None) -> NoReturn:  # sys.exit(5): a failing rank too
        global _failing
        if status not in (None, 0):
            _failing = True
        real_exit(status)

    sys.excepthook = hook
    sys.exit = exit


def _finalize(MPI: Any) -> None:
    """At exit: run the hooks, then finalize MPI; abort the job instead if a
    hook found an operation that finalizing would wait for forever."""
    if MPI.Is_finalized() or not owner() or _failing:
        return  # a forked child, or a failing rank: mpirun ends the job, naming this one
    clean = True
    for hook in _before:
        try:
            clean = hook(MPI) and clean
        except Exception:
            clean = False
    global finalizing
    finalizing = True  # the progress thread stops calling MPI
    if not clean:
        MPI.COMM_WORLD.Abort(1)
    MPI.Finalize()


def translate(exc: BaseException) -> BaseException:
    """An mpi4py exception as aiocomm's error (once, here)."""
    if _MPI is None or not isinstance(exc, _MPI.Exception):
        return exc
    try:
        text = exc.Get_error_string()
    except Exception:
        text = str(exc)
    err = CommError(f"MPI error: {text}")
    err.__cause__ = exc
    return err


_ULFM_CALLS = ("MPIX_Comm_agree", "MPIX_Comm_shrink", "MPIX_Comm_revoke")


def ulfm_missing() -> str | None:
    """None if the loaded MPI library has ULFM's fault tolerance (what
    ``agree`` and ``shrink`` need), else what is missing.  mpi4py offers
    ``Comm.Agree`` and ``Comm.Shrink`` either way, but without the library's
    own they fall back to plain collectives that a dead rank hangs."""
    import ctypes

    paths = set()
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1] if len(line.split()) >= 6 else ""
                if "libmpi" in os.path.basename(path) and ".so" in path:
                    paths.add(path)
    except OSError:
        return "the MPI library could not be inspected (/proc/self/maps)"
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        if all(hasattr(lib, name) for name in _ULFM_CALLS):
            return None
    return f"{' '.join(_ULFM_CALLS)} are not in the MPI library ({', '.join(sorted(paths)) or 'none loaded'})"

