"""Share a file from one rank with every other, in chunks of bytes, as
mlx-lm's share.py does with mx.distributed: the source passes each chunk as
``bytes``, the others pass zeros of the same length, and all_sum leaves the
source's bytes on every rank (the sum of the data and zeros).  Each rank
writes what it received and checks its SHA-256 against the source's.

    aiocomm-launch -n 4 examples/share_file.py [bytes] [chunk-bytes]
"""

import hashlib
import sys
import tempfile
from pathlib import Path

import numpy as np

import aiocomm

world = aiocomm.init()
rank, size = world.rank(), world.size()
nbytes = int(sys.argv[1]) if len(sys.argv) > 1 else 50_000_000
chunk = int(sys.argv[2]) if len(sys.argv) > 2 else 8 << 20
src = 0

with tempfile.TemporaryDirectory(prefix=f"share-rank{rank}-") as tmp:
    path = Path(tmp) / "weights.bin"
    if rank == src:  # the source has the file; here we make one
        path.write_bytes(np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8).tobytes())

    # The size first (the others do not know it), then the chunks.
    size_here = path.stat().st_size if rank == src else 0
    total = int(aiocomm.all_sum(np.array([size_here], np.int64))[0])
    with open(path, "rb" if rank == src else "wb") as f:
        for start in range(0, total, chunk):
            n = min(chunk, total - start)
            data = f.read(n) if rank == src else bytes(n)  # bytes in, as MLX takes them
            got = aiocomm.all_sum(data)  # a uint8 numpy array of n bytes
            if rank != src:
                f.write(got.tobytes())

    digest = hashlib.sha256(path.read_bytes()).digest()
    digests = aiocomm.all_gather(digest).reshape(size, 32)  # 32 bytes from each rank
    assert (digests == digests[src]).all(), f"rank {rank}: the file differs from rank {src}'s"
    if rank == 0:
        print(f"shared {total} bytes from rank {src} in {-(-total // chunk)} chunks: "
              f"sha256 {digest.hex()[:16]}... identical on {size} ranks")
