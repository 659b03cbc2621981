"""What MLX's own ring backend does, for the README's comparison table
(run by tests/test_mlx_ring_claims.py with MLX_RANK/MLX_HOSTFILE, one mode a run).

    ops       4 ranks: sum_scatter, Group.split, send to a rank that is not a neighbour
    mismatch  2 ranks: all_sum of shapes (4,) and (6,)
    exit      2 ranks: rank 1 exits while rank 0 waits in all_sum
    frozen    2 ranks: rank 1 stops (SIGSTOP) while rank 0 waits in all_sum
"""

import os
import signal
import sys
import time

import mlx.core as mx

mode = sys.argv[1]
g = mx.distributed.init(backend="ring", strict=True)
r = g.rank()


def attempt(what, fn):
    try:
        mx.eval(fn())
        print(f"{what}: ok", flush=True)
    except Exception as exc:  # reporting whatever MLX raises
        print(f"{what}: {type(exc).__name__}: {exc}", flush=True)


if mode == "ops":
    attempt("sum_scatter", lambda: mx.distributed.sum_scatter(mx.ones((8, 3))))
    try:
        g.split(r % 2)
        print("split: ok", flush=True)
    except Exception as exc:
        print(f"split: {type(exc).__name__}: {exc}", flush=True)
    if r == 0:
        attempt("send 0->2", lambda: mx.distributed.send(mx.ones((4,)), 2))
    elif r == 2:
        attempt("recv 2<-0", lambda: mx.distributed.recv_like(mx.ones((4,)), 0))
elif mode == "mismatch":
    y = mx.distributed.all_sum(mx.full((4 if r == 0 else 6,), float(r + 1)))
    print(f"mismatch: returned shape {tuple(y.shape)}", flush=True)
else:
    mx.eval(mx.distributed.all_sum(mx.ones((4,))))
    if r == 1:
        time.sleep(0.5)
        if mode == "exit":
            os._exit(3)
        os.kill(os.getpid(), signal.SIGSTOP)
    t0 = time.perf_counter()
    attempt("all_sum", lambda: mx.distributed.all_sum(mx.ones((4,))))
    print(f"after {time.perf_counter() - t0:.2f} s", flush=True)
