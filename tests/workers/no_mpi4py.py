"""Run aiocomm.init(backend=argv[1]) as if mpi4py were not installed:
every finder on sys.meta_path is wrapped so that it cannot find mpi4py."""

import sys


class Hiding:
    def __init__(self, inner):
        self.inner = inner

    def find_spec(self, name, path=None, target=None):
        if name == "mpi4py" or name.startswith("mpi4py."):
            return None
        find = getattr(self.inner, "find_spec", None)
        return None if find is None else find(name, path, target)

    def __getattr__(self, attr):
        return getattr(self.inner, attr)


sys.meta_path[:] = [Hiding(finder) for finder in sys.meta_path]

import aiocomm  # noqa: E402

try:
    import mpi4py  # noqa: F401
except ImportError:
    print("mpi4py hidden", flush=True)
try:
    world = aiocomm.init(backend=sys.argv[1] if len(sys.argv) > 1 else "any")
    print(f"OK size {world.size()}", flush=True)
except Exception as exc:
    print(f"FAILED {type(exc).__name__}: {exc}", flush=True)
