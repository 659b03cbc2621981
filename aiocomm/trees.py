"""Nested containers of arrays ("pytrees") and averaging gradients over a group.

A tree is a dict, list or tuple (named tuples included) whose leaves are
arrays or numbers; ``None`` leaves stay as they are.  :func:`average_gradients_steps`
averages every leaf over the group with one ``all_sum`` per *bucket*: leaves
are grouped by the dtype they travel in, and consecutive leaves of one dtype
are concatenated until a bucket would pass ``bucket_bytes`` (a leaf larger
than that travels alone).  Like :mod:`aiocomm.objects`, it is a generator of
steps that both faces drive.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from . import args, wire
from .objects import Steps, _call


def flatten(tree: Any) -> tuple[list[Any], Callable[[list[Any]], Any]]:
    """The leaves of ``tree`` in order, and a function that rebuilds a tree
    of the same structure from new leaves."""
    leaves: list[Any] = []

    def walk(node: Any) -> Callable[[list[Any]], Any]:
        if isinstance(node, dict):
            keys = list(node)
            builders = [walk(node[k]) for k in keys]
            mapping: type[dict[Any, Any]] = type(node)

            def rebuild_dict(new: list[Any]) -> Any:
                out = mapping()
                for k, build in zip(keys, builders, strict=True):
                    out[k] = build(new)
                return out

            return rebuild_dict
        if isinstance(node, (list, tuple)):
            items_of = [walk(item) for item in node]
            sequence: type[Any] = type(node)

            def rebuild_sequence(new: list[Any]) -> Any:
                items = [build(new) for build in items_of]
                if hasattr(sequence, "_fields"):  # a named tuple
                    return sequence(*items)
                return sequence(items)

            return rebuild_sequence
        index = len(leaves)
        leaves.append(node)
        return lambda new: new[index]

    build = walk(tree)
    return leaves, build


def average_gradients_steps(tree: Any, size: int, bucket_bytes: int, dtype: Any, kw: dict[str, Any]) -> Steps:
    leaves, rebuild = flatten(tree)
    arrays: dict[int, np.ndarray] = {}
    for i, leaf in enumerate(leaves):
        if leaf is None:
            continue
        arr = args.as_array(leaf)
        if arr.dtype == np.bool_:
            raise TypeError(f"average_gradients: leaf {i} is a bool array; only numbers can be averaged")
        arrays[i] = arr
    travel_as = None if dtype is None else wire.wire_dtype(dtype)
    buckets: dict[np.dtype, list[list[int]]] = {}
    filled: dict[np.dtype, int] = {}
    for i, arr in arrays.items():
        travel = travel_as or arr.dtype
        nbytes = arr.size * travel.itemsize
        runs = buckets.setdefault(travel, [[]])
        if runs[-1] and filled[travel] + nbytes > bucket_bytes:
            runs.append([])
            filled[travel] = 0
        runs[-1].append(i)
        filled[travel] = filled.get(travel, 0) + nbytes
    out: list[Any] = list(leaves)
    for travel, runs in buckets.items():
        for run in runs:
            if len(run) == 1:
                flat = arrays[run[0]].astype(travel, copy=False).reshape(-1)
            else:
                flat = np.concatenate([arrays[i].astype(travel, copy=False).reshape(-1) for i in run])
            total = (yield _call("all_sum", flat, **kw)) if size > 1 else flat
            offset = 0
            for i in run:
                arr = arrays[i]
                part = total[offset : offset + arr.size].reshape(arr.shape).astype(arr.dtype)
                offset += arr.size
                if arr.dtype.kind in "iu":
                    out[i] = (part // size).astype(arr.dtype)
                else:
                    out[i] = part / np.asarray(size, arr.dtype)
    return rebuild(out)
