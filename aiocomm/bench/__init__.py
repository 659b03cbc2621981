"""Benchmarks: ``python -m aiocomm.bench`` (aiocomm's collectives, nccl-tests
columns) and ``python -m aiocomm.bench.compare`` (side by side with torch's
gloo, OpenMPI, MLX's ring backend and the physical duplex reference)."""
