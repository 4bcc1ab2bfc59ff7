"""The checkers catch what they are meant to catch, on small made-up histories."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from checker import check  # noqa: E402
from workload import ABORTED_PREFIX, History, make_value  # noqa: E402


def clean_history() -> History:
    h = History()
    for seq in range(6):
        v = make_value(0, seq)
        p, o = seq % 2, seq // 2
        h.acked.append((0, seq, v, p, o, float(seq)))
        h.reads.append((p, o, v, 10.0 + seq))
        h.final_log.append((p, o, v))
    h.commits = [(20.0, {0: 2, 1: 2}), (21.0, {0: 3, 1: 3})]
    h.observed_commits = [(22.0, {0: 3, 1: 3})]
    h.final_commits = {0: 3, 1: 3}
    return h


def test_a_clean_history_passes():
    v = check(clean_history())
    assert v.ok, v.violations
    assert v.acknowledged == 6 and not v.lost and not v.duplicated


def test_a_lost_value_is_listed():
    h = clean_history()
    h.final_log = [r for r in h.final_log if r[2] != make_value(0, 4)]
    v = check(h)
    assert len(v.lost) == 1 and "p0-00000004" in v.lost[0]
    assert {"lost", "acked-offsets", "reads-in-log"} <= set(v.violations)


def test_a_duplicate_is_listed():
    h = clean_history()
    h.final_log.append((0, 3, make_value(0, 2)))
    v = check(h)
    assert len(v.duplicated) == 1 and "p0-00000002" in v.duplicated[0]
    assert "order" in v.violations


def test_two_values_at_one_offset():
    h = clean_history()
    h.reads.append((1, 0, make_value(1, 0), 30.0))
    assert "offset-conflicts" in check(h).violations


def test_acknowledged_out_of_order():
    h = clean_history()
    h.final_log = [(0, 0, make_value(0, 2)), (0, 1, make_value(0, 0))] + \
        [r for r in h.final_log if r[0] == 0 and r[1] >= 2] + [r for r in h.final_log if r[0] == 1]
    v = check(h)
    assert "order" in v.violations and "acked-offsets" in v.violations


def test_commits_going_backwards():
    h = clean_history()
    h.commits.append((23.0, {0: 1}))
    assert "commits-monotonic" in check(h).violations
    h = clean_history()
    h.observed_commits.append((24.0, {1: 2}))
    assert "commits-monotonic" in check(h).violations
    h = clean_history()
    h.final_commits = {0: 3}
    assert "commits-monotonic" in check(h).violations


def test_a_value_the_group_never_got():
    h = clean_history()
    h.reads = h.reads[:-1]
    assert list(check(h).violations) == ["group-read-all"]


def test_the_pipeline_must_copy_every_value_once_and_nothing_else():
    h = clean_history()
    h.final_copy = [(p % 2, i, v) for i, (p, _, v) in enumerate(h.final_log)]
    assert check(h).ok
    missing, twice = make_value(0, 1), make_value(0, 5)
    h.final_copy = [r for r in h.final_copy if r[2] != missing] + [(0, 99, twice)]
    found = check(h).violations["pipeline-exactly-once"]
    assert len(found) == 2
    assert "p0-00000001 is in the topic but the pipeline did not copy it" in found[0]
    assert "p0-00000005 copied by the pipeline 1 time(s) more" in found[1]


def copied(h: History) -> list:
    """The queue copied partition for partition, in order, as the transactional copier does."""
    return [(p, o, v) for p, o, v in sorted(h.final_log)]


def test_the_transactional_copier_must_copy_every_value_once():
    h = clean_history()
    h.final_txn_copy = copied(h)
    assert check(h).ok
    h.final_txn_copy = copied(h)[1:] + [(1, 99, make_value(0, 3))]
    found = check(h).violations["txn-exactly-once"]
    assert len(found) == 2 and "did not copy" in found[0] and "1 time(s) more" in found[1]


def test_a_marker_of_an_aborted_transaction_read_committed_is_an_aborted_read():
    h = clean_history()
    h.final_txn_copy = copied(h) + [(0, 3, ABORTED_PREFIX + b"7")]
    assert list(check(h).violations) == ["aborted-reads"]
    h.final_txn_copy = copied(h)
    h.txn_live_reads = [(0, 3, ABORTED_PREFIX + b"7", 1.0)]
    assert list(check(h).violations) == ["aborted-reads"]


def test_a_live_read_the_copy_no_longer_holds_is_an_aborted_read():
    h = clean_history()
    h.final_txn_copy = copied(h)
    h.txn_live_reads = [(p, o, v, 1.0) for p, o, v in copied(h)]
    assert check(h).ok
    h.txn_live_reads.append((1, 0, make_value(0, 5), 2.0))  # 1/0 holds p0-00000001
    assert list(check(h).violations) == ["aborted-reads"]


def test_the_copy_keeps_each_producers_order():
    h = clean_history()
    h.final_txn_copy = [(0, 0, make_value(0, 2)), (0, 1, make_value(0, 0))] + \
        [r for r in copied(h) if r[0] == 1] + [(0, 2, make_value(0, 4))]
    assert list(check(h).violations) == ["txn-order"]


def test_the_file_pipeline_must_carry_every_line_once_in_order():
    h = clean_history()
    h.file_lines = [f"line-{i:08d}".encode() for i in range(4)]
    h.final_file_topic = [(0, i, v) for i, v in enumerate(h.file_lines)]
    h.final_file_sink = list(reversed(h.file_lines))  # the sink's order is not checked
    assert check(h).ok
    h.final_file_topic = [(0, 0, h.file_lines[1]), (0, 1, h.file_lines[0])] + \
        [(0, i, v) for i, v in enumerate(h.file_lines) if i >= 2]
    found = check(h).violations["file-pipeline-exactly-once"]
    assert len(found) == 1 and "out of order from offset 0" in found[0], found
    h.final_file_topic = [(0, i, v) for i, v in enumerate(h.file_lines)]
    h.final_file_sink = h.file_lines[:3] + [h.file_lines[0]]
    found = check(h).violations["file-pipeline-exactly-once"]
    assert len(found) == 2, found
    assert "line-00000003 written to the file but not in the sink" in found[0]
    assert "line-00000000 in the sink's file 1 time(s) more" in found[1]
