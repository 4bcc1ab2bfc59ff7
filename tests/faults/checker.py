"""Checkers over a queue History, run once the cluster has healed.

Each checker returns a list of violations (human-readable lines); an empty list means it
holds. `check(history)` runs them all and adds the counts the summary line prints.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

from workload import ABORTED_PREFIX, History, parse_value

SHOW = 10  # examples listed per violation


@dataclass
class Verdict:
    acknowledged: int = 0
    failed: int = 0
    lost: list = field(default_factory=list)
    duplicated: list = field(default_factory=list)
    violations: dict = field(default_factory=dict)  # checker name -> [lines]
    notes: list = field(default_factory=list)
    fatal: int = 0  # producers replaced after a fatal error

    @property
    def ok(self) -> bool:
        return not any(self.violations.values())


def _fmt(items, n=SHOW) -> str:
    items = list(items)
    more = f" ... and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(str(i) for i in items[:n]) + more


def lost_values(h: History) -> list[str]:
    """Every acknowledged value is in the log as read after healing."""
    logged = {v for _, _, v in h.final_log}
    lost = sorted({(p, o, v) for _, _, v, p, o, _ in h.acked if v not in logged})
    return [f"{v.decode()} (acknowledged at {p}/{o})" for p, o, v in lost]


def duplicated_values(h: History) -> list[str]:
    """No value is in the log twice (the producers are idempotent)."""
    where = defaultdict(list)
    for p, o, v in h.final_log:
        where[v].append(f"{p}/{o}")
    return [f"{v.decode()} at {', '.join(at)}" for v, at in sorted(where.items()) if len(at) > 1]


def offset_conflicts(h: History) -> list[str]:
    """No two values at one offset, across acknowledgements, group reads and the final log."""
    seen = defaultdict(set)
    for _, _, v, p, o, _ in h.acked:
        seen[(p, o)].add(("acked", v))
    for p, o, v, _ in h.reads:
        seen[(p, o)].add(("read", v))
    for p, o, v in h.final_log:
        seen[(p, o)].add(("log", v))
    out = []
    for (p, o), vs in sorted(seen.items()):
        if len({v for _, v in vs}) > 1:
            out.append(f"{p}/{o}: " + ", ".join(f"{src}={v.decode()}" for src, v in sorted(vs)))
    return out


def acked_offsets(h: History) -> list[str]:
    """An acknowledged value sits at the offset it was acknowledged at."""
    at = {(p, o): v for p, o, v in h.final_log}
    out = []
    for _, _, v, p, o, _ in sorted(h.acked, key=lambda a: (a[3], a[4])):
        got = at.get((p, o))
        if got != v:
            out.append(f"{v.decode()} acknowledged at {p}/{o}, the log has "
                       f"{got.decode() if got is not None else 'nothing'} there")
    return out


def _out_of_order(log: list, where: str) -> list[str]:
    """Per partition of `log` ((partition, offset, value)), the places where a producer's
    sequence numbers do not grow."""
    out = []
    last = {}
    for p, o, v in sorted(log):
        prod, seq = parse_value(v)
        prev = last.get((p, prod))
        if prev is not None and seq <= prev[0]:
            out.append(f"{where} {p}: p{prod} seq {seq} at offset {o} after seq {prev[0]} "
                       f"at offset {prev[1]}")
        last[(p, prod)] = (seq, o)
    return out


def produce_order(h: History) -> list[str]:
    """Per partition, each producer's values are in the order it produced them, and its
    acknowledged offsets grow with its sequence numbers."""
    out = _out_of_order(h.final_log, "partition")
    acks = defaultdict(list)
    for prod, seq, _, p, o, _ in h.acked:
        acks[(p, prod)].append((seq, o))
    for (p, prod), pairs in sorted(acks.items()):
        pairs.sort()
        for (s1, o1), (s2, o2) in zip(pairs, pairs[1:]):
            if o2 <= o1:
                out.append(f"partition {p}: p{prod} seq {s2} acknowledged at offset {o2}, "
                           f"not after seq {s1} at {o1}")
    return out


def reads_in_log(h: History) -> list[str]:
    """What the group read (only up to the high watermark) is still in the log."""
    logged = {(p, o, v) for p, o, v in h.final_log}
    gone = sorted({(p, o, v) for p, o, v, _ in h.reads if (p, o, v) not in logged})
    return [f"{v.decode()} read at {p}/{o}" for p, o, v in gone]


def group_read_everything(h: History) -> list[str]:
    """The consumer group was given every acknowledged value."""
    read = {v for _, _, v, _ in h.reads}
    missing = sorted({v for _, _, v, _, _, _ in h.acked if v not in read})
    return [v.decode() for v in missing]


def commits_monotonic(h: History) -> list[str]:
    """Committed offsets per partition never go backwards: neither the acknowledged commits
    in the order they were acknowledged, nor what the coordinator reports afterwards."""
    out = []
    events = sorted([(t, "commit", offs) for t, offs in h.commits] +
                    [(t, "observed", offs) for t, offs in h.observed_commits],
                    key=lambda e: (e[0], e[1]))
    high: dict[int, int] = {}
    for t, kind, offs in events:
        for p, o in sorted(offs.items()):
            if o < high.get(p, -1):
                out.append(f"partition {p}: {kind} offset {o} after an acknowledged commit of "
                           f"{high[p]} (t={t:.1f})")
            if kind == "commit":
                high[p] = max(high.get(p, -1), o)
    for p, o in sorted(high.items()):
        final = h.final_commits.get(p)
        if final is None or final < o:
            out.append(f"partition {p}: the group's committed offset after healing is {final}, "
                       f"below the acknowledged commit {o}")
    return out


def pipeline_copied_once(h: History) -> list[str]:
    """The exactly-once pipeline copied every value of the topic once, and nothing else
    (nothing of an aborted transaction, no value twice across the pipeline's moves)."""
    if h.final_copy is None:
        return []
    return _copied_once(h.final_log, h.final_copy, "the pipeline")


def _copied_once(source_log: list, copy: list, who: str) -> list[str]:
    source = Counter(v for _, _, v in source_log)
    copied = Counter(v for _, _, v in copy)
    out = [f"{v.decode()} is in the topic but {who} did not copy it" for v in sorted(source - copied)]
    out += [f"{v.decode()} copied by {who} {n} time(s) more than the topic holds it"
            for v, n in sorted((copied - source).items())]
    return out


def txn_copied_once(h: History) -> list[str]:
    """The Kafka client's transactional copier copied every value of the topic once, and, read
    committed, nothing of the transactions it aborted."""
    if h.final_txn_copy is None:
        return []
    copy = [r for r in h.final_txn_copy if not r[2].startswith(ABORTED_PREFIX)]
    return _copied_once(h.final_log, copy, "the transactional copier")


def txn_copy_order(h: History) -> list[str]:
    """The copy keeps each producer's order within a partition (a batch is copied to the
    partition it came from, in order; an aborted batch is copied again in the same order)."""
    copy = [r for r in h.final_txn_copy or [] if not r[2].startswith(ABORTED_PREFIX)]
    return _out_of_order(copy, "copy partition")


def aborted_reads(h: History) -> list[str]:
    """A read_committed consumer never sees a record of an aborted transaction (the markers
    `aborted-<n>` are only ever written in transactions the copier aborts), and what it read
    while the faults ran is in the copy for good, at the same offset."""
    if h.final_txn_copy is None:
        return []
    out = [f"{v.decode()} read at {p}/{o} after healing" for p, o, v in h.final_txn_copy
           if v.startswith(ABORTED_PREFIX)]
    out += [f"{v.decode()} read at {p}/{o} while the faults ran" for p, o, v, _ in h.txn_live_reads
            if v.startswith(ABORTED_PREFIX)]
    final = {(p, o): v for p, o, v in h.final_txn_copy}
    out += [f"{v.decode()} read at {p}/{o} while the faults ran, the copy has "
            f"{final[(p, o)].decode() if (p, o) in final else 'nothing'} there after healing"
            for p, o, v, _ in sorted(set(h.txn_live_reads)) if final.get((p, o)) != v]
    return out


def file_pipeline_once(h: History) -> list[str]:
    """The pipeline from a file through a WASM plugin into a topic and out to a file sink put
    every line of the file into the topic once, in order, and into the sink's file once."""
    if h.final_file_topic is None:
        return []
    want = list(h.file_lines)
    out = []
    topic = [v for _, _, v in sorted(h.final_file_topic)]
    if topic != want:
        c_topic, c_want = Counter(topic), Counter(want)
        out += [f"{v.decode()} written to the file but not in the topic" for v in sorted(c_want - c_topic)]
        out += [f"{v.decode()} in the topic {n} time(s) more than written"
                for v, n in sorted((c_topic - c_want).items())]
        if not out:
            first = next(i for i, (a, b) in enumerate(zip(topic, want)) if a != b)
            out.append(f"the topic holds the lines out of order from offset {first}: "
                       f"{topic[first].decode()} where {want[first].decode()} was written")
    sink, c_want = Counter(h.final_file_sink or []), Counter(want)
    out += [f"{v.decode()} written to the file but not in the sink's file"
            for v in sorted(c_want - sink)]
    out += [f"{v.decode()} in the sink's file {n} time(s) more than written"
            for v, n in sorted((sink - c_want).items())]
    return out


CHECKERS = {
    "lost": lost_values,
    "duplicated": duplicated_values,
    "offset-conflicts": offset_conflicts,
    "acked-offsets": acked_offsets,
    "order": produce_order,
    "reads-in-log": reads_in_log,
    "group-read-all": group_read_everything,
    "commits-monotonic": commits_monotonic,
    "pipeline-exactly-once": pipeline_copied_once,
    "txn-exactly-once": txn_copied_once,
    "txn-order": txn_copy_order,
    "aborted-reads": aborted_reads,
    "file-pipeline-exactly-once": file_pipeline_once,
}


def check(h: History) -> Verdict:
    v = Verdict(acknowledged=len(h.acked), failed=len(h.failed),
                fatal=sum(1 for _, _, e in h.client_errors if e == "replaced after a fatal error"))
    for name, fn in CHECKERS.items():
        found = fn(h)
        if name == "lost":
            v.lost = found
        elif name == "duplicated":
            v.duplicated = found
        if found:
            v.violations[name] = found
    # Not violations: a failed delivery may or may not have been written.
    if h.failed:
        logged = {val for _, _, val in h.final_log}
        errs = Counter(e for *_, e, _ in h.failed)
        present = sum(1 for f in h.failed if f[2] in logged)
        v.notes.append(f"{len(h.failed)} delivery failure(s) ({_fmt(f'{k}x{n}' for k, n in errs.items())}), "
                       f"{present} of them in the log anyway")
    if h.failed_commits:
        v.notes.append(f"{len(h.failed_commits)} commit(s) failed: {_fmt(e for _, e in h.failed_commits[:3])}")
    if h.client_errors:
        v.notes.append(f"{len(h.client_errors)} client error(s): "
                       f"{_fmt((f'{s}: {e}' for _, s, e in h.client_errors), 5)}")
    return v


def report(v: Verdict) -> str:
    lines = []
    for name, found in v.violations.items():
        lines.append(f"VIOLATION {name}: {len(found)}")
        lines += [f"    {x}" for x in found[:SHOW]]
        if len(found) > SHOW:
            lines.append(f"    ... and {len(found) - SHOW} more")
    lines += [f"note: {n}" for n in v.notes]
    return "\n".join(lines)
