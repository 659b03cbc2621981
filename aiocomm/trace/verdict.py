"""The verdict on a hung or failed job, from its ranks' records (see :mod:`aiocomm.trace`).

Pure: :func:`read_dir` parses the files, :func:`verdict` turns the records
into lines of text, :func:`chrome_trace` into a Chrome trace (Perfetto and
``chrome://tracing`` open it), with nothing else in between.

How the verdict is drawn.  A rank that is *in* an operation (its last call
on a stream of a group has not completed: in flight, timed out or failed)
waits for every member that has not started that operation: for a
collective, the members whose count of collectives on that group does not
reach its sequence number; for a receive, a sender that sent that rank fewer
messages on the group (and the other way round for a send).  Following these
waits leads to the ranks that are *behind*: waited for, and waiting for
nobody themselves (in no call, or stuck somewhere else).  Beside them the
verdict lists, for each group, the ranks whose sequences disagree (how many
collectives each started, and its last), and the first sequence number at
which ranks called different operations.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

from . import COMPLETED, STARTED

P2P = ("send", "recv")
#: Numbered on their own (Group.agree and Group.shrink): they complete without the dead.
AGREEMENT = ("agree", "shrink")


@dataclass
class Op:
    """One operation of a rank's record."""

    group: int
    seq: int
    op: str
    dtype: str | None
    shape: tuple[int, ...] | None
    peer: int | None  # world rank
    state: str
    start: float
    end: float | None
    error: str | None

    @property
    def stream(self) -> tuple[int, str, int | None]:
        """(group, "collectives" or the p2p kind, peer) -- the calls numbered together."""
        if self.op in AGREEMENT:
            return (self.group, "agreement", None)
        return (self.group, "collectives", None) if self.op not in P2P else (self.group, self.op, self.peer)

    def describe(self) -> str:
        text = f"{self.op} seq {self.seq}"
        if self.op == "send":
            text += f" to rank {self.peer}"
        elif self.op == "recv":
            text += f" from rank {self.peer}"
        elif self.peer is not None:
            text += f" (root {self.peer})"
        if self.dtype is not None:
            text += f" [{self.dtype}{list(self.shape) if self.shape is not None else ''}]"
        return text


@dataclass
class GroupInfo:
    members: tuple[int, ...]
    backend: str = "?"


@dataclass
class RankRecord:
    """One rank's record file."""

    rank: int
    size: int | None
    reason: str
    written: float
    path: str
    groups: dict[int, GroupInfo] = field(default_factory=dict)
    ops: list[Op] = field(default_factory=list)
    full: bool = False


def read_file(path: str) -> RankRecord | None:
    """One record file; ``None`` if it is not one (malformed lines are skipped)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            raw = f.read().splitlines()
    except OSError:
        return None
    rows: list[dict[str, Any]] = []
    for line in raw:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    if not rows or rows[0].get("trace") != 1 or not isinstance(rows[0].get("rank"), int):
        return None
    head = rows[0]
    record = RankRecord(head["rank"], head.get("size"), str(head.get("reason", "?")),
                        float(head.get("written", 0.0)), path, full=bool(head.get("full")))
    for row in rows[1:]:
        try:
            if "members" in row:
                record.groups[int(row["group"])] = GroupInfo(tuple(int(m) for m in row["members"]),
                                                             str(row.get("backend", "?")))
            elif "op" in row:
                shape = row.get("shape")
                record.ops.append(Op(
                    int(row["group"]), int(row["seq"]), str(row["op"]), row.get("dtype"),
                    tuple(shape) if isinstance(shape, list) else None, row.get("peer"), str(row["state"]),
                    float(row["start"]), None if row.get("end") is None else float(row["end"]), row.get("error"),
                ))
        except (KeyError, TypeError, ValueError):
            continue
    return record


def read_dir(directory: str) -> dict[int, RankRecord]:
    """Every rank's record in ``directory`` (files ``rank-N.jsonl``), by world rank."""
    records: dict[int, RankRecord] = {}
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return records
    for name in names:
        if re.fullmatch(r"rank-\d+\.jsonl", name):
            record = read_file(os.path.join(directory, name))
            if record is not None:
                records[record.rank] = record
    return records


def _ranks(ranks: list[int] | set[int]) -> str:
    ordered = sorted(ranks)
    return ("rank " if len(ordered) == 1 else "ranks ") + ", ".join(map(str, ordered))


class _Job:
    """What the records say, indexed for the verdict."""

    def __init__(self, records: dict[int, RankRecord]) -> None:
        self.records = records
        sizes = [r.size for r in records.values() if r.size]
        self.size = max([*sizes, max(records) + 1]) if records else 0
        self.members: dict[int, tuple[int, ...]] = {}
        for record in records.values():
            for context, info in record.groups.items():
                self.members.setdefault(context, info.members)
        # calls started, per rank, per stream: the highest sequence number + 1
        self.count: dict[int, dict[tuple[int, str, int | None], int]] = {}
        self.last: dict[int, dict[tuple[int, str, int | None], Op]] = {}
        for rank, record in records.items():
            counts, last = self.count.setdefault(rank, {}), self.last.setdefault(rank, {})
            for op in record.ops:
                if op.seq + 1 >= counts.get(op.stream, 0):
                    counts[op.stream] = op.seq + 1
                    last[op.stream] = op
        self.waits: dict[int, dict[int, Op]] = {}  # rank -> the rank it waits for -> the op it waits in
        for rank in records:
            for op in self.stuck(rank):
                for other in self.waited_for(rank, op):
                    self.waits.setdefault(rank, {}).setdefault(other, op)

    def stuck(self, rank: int) -> list[Op]:
        """The operations ``rank`` is in: the last call of each stream, if it has not completed."""
        return sorted((op for op in self.last[rank].values() if op.state != COMPLETED), key=lambda op: op.start)

    def started(self, rank: int, stream: tuple[int, str, int | None]) -> int:
        return self.count.get(rank, {}).get(stream, 0)

    def waited_for(self, rank: int, op: Op) -> list[int]:
        if op.op in P2P:
            peer = op.peer
            if peer is None or peer == rank:
                return []
            mirror = (op.group, "send" if op.op == "recv" else "recv", rank)
            return [peer] if peer not in self.records or self.started(peer, mirror) <= op.seq else []
        members = self.members.get(op.group, ())
        return [m for m in members
                if m != rank and (m not in self.records or self.started(m, op.stream) <= op.seq)]

    def group_name(self, context: int) -> str:
        if context == 0:
            return "the world group"
        members = self.members.get(context)
        inside = f" (world {_ranks(list(members))})" if members is not None else ""
        return f"group {context:#x}{inside}"

    def where(self, rank: int) -> str:
        """What ``rank`` was doing when its record was written."""
        record = self.records.get(rank)
        if record is None:
            return f"no record from rank {rank} (it ended before it could write one, or was not started " \
                   "with AIOCOMM_TRACE_DIR)"
        stuck = self.stuck(rank)
        if stuck:
            return "; ".join(f"rank {rank} is in {op.describe()} of {self.group_name(op.group)} "
                             f"({self.state(op, record)})" for op in stuck)
        if not record.ops:
            return f"rank {rank} has made no aiocomm call (record written at {record.reason})"
        op = max(record.ops, key=lambda o: o.start)
        ago = record.written - (op.end if op.end is not None else op.start)
        return (f"rank {rank} is in no aiocomm call: its last was {op.describe()} of {self.group_name(op.group)}, "
                f"completed {ago:.1f} s before its record was written ({record.reason})")

    @staticmethod
    def state(op: Op, record: RankRecord) -> str:
        if op.state == STARTED:
            return f"in flight for {record.written - op.start:.1f} s"
        took = (op.end or record.written) - op.start
        why = f": {op.error}" if op.error else ""
        if len(why) > 200:
            why = why[:197] + "..."
        return f"{op.state} after {took:.1f} s{why}"


def behind(records: dict[int, RankRecord]) -> list[int]:
    """The ranks that are behind: waited for by others and waiting for nobody."""
    job = _Job(records)
    waited = {other for targets in job.waits.values() for other in targets}
    roots = sorted(r for r in waited if not job.waits.get(r))
    return roots or sorted(waited)


def _cycle(job: _Job) -> list[int]:
    """Ranks that wait for each other in a ring (a deadlock), if the waits have no rank at their end."""
    waited = {other for targets in job.waits.values() for other in targets}
    if not waited or any(not job.waits.get(r) for r in waited):
        return []
    return sorted(r for r in waited if r in job.waits)


def verdict(records: dict[int, RankRecord]) -> list[str]:
    """The verdict as lines of text (see the module's notes)."""
    if not records:
        return ["no records to read"]
    job = _Job(records)
    lines = []
    missing = sorted(set(range(job.size)) - set(records))
    head = f"records of {_ranks(list(records))}"
    if missing:
        head += f"; none from {_ranks(missing)}"
    lines.append(head)
    cycle = _cycle(job)
    if cycle:
        lines.append(f"{_ranks(cycle)} wait for each other: each is in a call another has not started "
                     "(collectives of different groups called in a different order, or sends and receives "
                     "that both wait)")
    for rank in behind(records):
        waiters: dict[tuple[int, str, int, str], list[int]] = {}
        for waiter, targets in job.waits.items():
            if rank in targets:
                op = targets[rank]
                waiters.setdefault((op.group, op.op, op.seq, op.describe()), []).append(waiter)
        for (context, name, _seq, described), ranks in sorted(waiters.items()):
            if name in P2P:
                what = f"{_ranks(ranks)} {'is' if len(ranks) == 1 else 'are'} waiting for it in {described} of " \
                       f"{job.group_name(context)}"
            else:
                done = job.started(rank, (context, "collectives", None))
                if rank not in records:
                    at = "it wrote no record"
                elif done:
                    at = f"it has started {done} collective{'s' if done != 1 else ''} there, up to seq {done - 1}"
                else:
                    at = "it has started none there"
                what = f"{_ranks(ranks)} {'is' if len(ranks) == 1 else 'are'} waiting in {described} of " \
                       f"{job.group_name(context)}, which rank {rank} has not started ({at})"
            lines.append(f"rank {rank} is behind: {what}")
        lines.append(job.where(rank))
    lines.extend(_disagreements(job))
    if len(lines) == 1:
        lines.append("no rank is behind: the records agree on the sequence of every group")
        for rank in sorted(records):
            if job.stuck(rank):
                lines.append(job.where(rank))
    return lines


def _disagreements(job: _Job) -> list[str]:
    lines = []
    for context, members in sorted(job.members.items()):
        stream = (context, "collectives", None)
        present = [m for m in members if m in job.records]
        by_count: dict[tuple[int, str], list[int]] = {}
        for m in present:
            n = job.started(m, stream)
            last = job.last[m].get(stream)
            tail = f", last {last.op} seq {last.seq} ({last.state})" if last is not None else ""
            by_count.setdefault((n, tail), []).append(m)
        if len({n for n, _ in by_count}) > 1:
            parts = [f"{_ranks(ranks)} started {n} collective{'s' if n != 1 else ''}{tail}"
                     for (n, tail), ranks in sorted(by_count.items(), key=lambda item: (-item[0][0], item[1]))]
            lines.append(f"ranks disagree on the sequence of {job.group_name(context)}: " + "; ".join(parts))
        calls: dict[int, dict[tuple[Any, ...], list[int]]] = {}
        for m in present:
            for op in job.records[m].ops:
                if op.group == context and op.op not in P2P and op.op not in AGREEMENT:
                    shape = None if op.op == "all_gather_v" or op.shape is None else op.shape
                    calls.setdefault(op.seq, {}).setdefault((op.op, op.dtype, shape, op.peer), []).append(m)
        for seq in sorted(calls):
            if len(calls[seq]) > 1:
                kinds = "; ".join(
                    f"{_ranks(ranks)} {name}" + (f" [{dtype}{list(shape) if shape else ''}]" if dtype else "")
                    + (f" root {peer}" if peer is not None else "")
                    for (name, dtype, shape, peer), ranks in sorted(calls[seq].items(), key=lambda i: i[1]))
                lines.append(f"ranks called different operations at seq {seq} of {job.group_name(context)}: {kinds}")
                break
    return lines


def chrome_trace(records: dict[int, RankRecord]) -> dict[str, Any]:
    """The records as a Chrome trace (JSON object format): one process per
    rank (pid = rank, one thread), one complete event per operation; an
    operation still in flight lasts until its record was written."""
    starts = [op.start for record in records.values() for op in record.ops]
    origin = min(starts) if starts else 0.0
    events: list[dict[str, Any]] = []
    for rank, record in sorted(records.items()):
        events.append({"name": "process_name", "ph": "M", "pid": rank, "tid": 0, "args": {"name": f"rank {rank}"}})
        events.append({"name": "process_sort_index", "ph": "M", "pid": rank, "tid": 0, "args": {"sort_index": rank}})
        events.append({"name": "thread_name", "ph": "M", "pid": rank, "tid": 0, "args": {"name": "aiocomm calls"}})
        for op in record.ops:
            end = op.end if op.end is not None else record.written
            events.append({
                "name": op.op, "cat": "p2p" if op.op in P2P else "collective", "ph": "X", "pid": rank, "tid": 0,
                "ts": round((op.start - origin) * 1e6, 3), "dur": round(max(0.0, end - op.start) * 1e6, 3),
                "args": {"group": f"{op.group:#x}", "seq": op.seq, "dtype": op.dtype,
                         "shape": list(op.shape) if op.shape is not None else None, "peer": op.peer,
                         "state": op.state, "error": op.error},
            })
        events.append({"name": f"record written ({record.reason})", "ph": "i", "s": "t", "pid": rank, "tid": 0,
                       "ts": round((record.written - origin) * 1e6, 3)})
    return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": {"origin_unix_s": origin}}
