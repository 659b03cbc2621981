"""Group.split into the rows and columns of a 2-D process grid, with a
reduction along each.

    aiocomm-launch -n 4 examples/split_groups.py      (a 2 x 2 grid; 6 ranks make 2 x 3)
"""

import numpy as np

import aiocomm

world = aiocomm.init()
rank, size = world.rank(), world.size()
cols = 2 if size % 2 == 0 else 1
nrows = size // cols
assert nrows * cols == size
row, col = divmod(rank, cols)

row_group = world.split(color=row, key=col)   # ranks in my row, ordered by column
col_group = world.split(color=col, key=row)   # ranks in my column, ordered by row
assert row_group.rank() == col and col_group.rank() == row

# A global matrix A, one element per rank: A[row, col] = rank.
mine = np.array([float(rank)])
row_sums = aiocomm.all_sum(mine, group=row_group)   # sum along my row
col_sums = aiocomm.all_sum(mine, group=col_group)   # sum along my column
row_members = aiocomm.all_gather(np.array([rank]), group=row_group)

A = np.arange(size, dtype=float).reshape(nrows, cols)
assert row_sums[0] == A[row].sum() and col_sums[0] == A[:, col].sum()
assert row_members.tolist() == A[row].astype(int).tolist()
print(f"rank {rank} at ({row}, {col}): row sum {row_sums[0]:.0f}, column sum {col_sums[0]:.0f}, "
      f"row members {row_members.tolist()}")
