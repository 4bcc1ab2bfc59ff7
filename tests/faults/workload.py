"""The workloads: idempotent acks=all producers appending unique values to a queue, a consumer
group reading them and committing after processing, and a Kafka client's transactional
consume-transform-produce loop copying the queue, watched by a read_committed reader.
Everything the clients are told is kept in a History for the checkers.

A value is `p<producer>-<seq>` (seq zero-padded); producer k sends its n-th value to
partition n % partitions, so every (producer, partition) pair has its own produce order.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from confluent_kafka import (OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Producer,
                             TopicPartition)


def make_value(producer: int, seq: int) -> bytes:
    return f"p{producer}-{seq:08d}".encode()


def parse_value(value: bytes) -> tuple[int, int]:
    """(producer, seq) of a value made by make_value."""
    head, seq = value.decode().split("-")
    return int(head[1:]), int(seq)


@dataclass
class History:
    """What the clients were told, with time.monotonic() stamps."""
    # (producer, seq, value, partition, offset, t): acknowledged writes
    acked: list = field(default_factory=list)
    # (producer, seq, value, partition, error name, t): definite delivery failures
    failed: list = field(default_factory=list)
    # (partition, offset, value, t): what the group consumer read
    reads: list = field(default_factory=list)
    # (t, {partition: offset}): commits the coordinator acknowledged, in order
    commits: list = field(default_factory=list)
    # (t, error): commits that failed
    failed_commits: list = field(default_factory=list)
    # (t, {partition: offset}): committed offsets read back from the coordinator
    observed_commits: list = field(default_factory=list)
    # (t, source, error): fatal producer errors, consumer errors and the like
    client_errors: list = field(default_factory=list)
    # after healing: the whole log read from the beginning, (partition, offset, value)
    final_log: list = field(default_factory=list)
    # after healing: {partition: high watermark}
    end_offsets: dict = field(default_factory=dict)
    # after healing: {partition: committed offset} as the coordinator lists it
    final_commits: dict = field(default_factory=dict)
    # after healing: what the exactly-once pipeline copied from the topic, read_committed,
    # (partition, offset, value); None when the campaign ran no pipeline
    final_copy: list | None = None
    # the transactional copier: (t, transaction number, outcome, records) with outcome
    # "committed", "aborted" (on purpose) or the error that made it abort or start over
    txns: list = field(default_factory=list)
    # what a read_committed reader of the copier's topic read while the faults ran,
    # (partition, offset, value, t)
    txn_live_reads: list = field(default_factory=list)
    # after healing: the copier's topic read_committed, (partition, offset, value); None when
    # the campaign ran no copier
    final_txn_copy: list | None = None
    # the lines appended to the file pipeline's input file, in order
    file_lines: list = field(default_factory=list)
    # after healing: the file pipeline's topic read_committed, and its file sink's lines;
    # None when the campaign ran no file pipeline
    final_file_topic: list | None = None
    final_file_sink: list | None = None

    def __post_init__(self):
        self.lock = threading.Lock()

    def add(self, name: str, item) -> None:
        with self.lock:
            getattr(self, name).append(item)


def _client_logger(name: str, path: Path | None):
    """A logger writing a client's librdkafka log lines to `path`, or None."""
    if path is None:
        return None
    logger = logging.getLogger(f"faults.{name}")
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logger.addHandler(handler)
    return logger


class QueueProducer:
    """One idempotent acks=all producer thread sending `rate` values a second."""

    def __init__(self, index: int, bootstrap: str, topic: str, partitions: int, rate: float,
                 history: History, client_log: Path | None = None):
        self.index, self.bootstrap, self.topic = index, bootstrap, topic
        self.client_log = _client_logger(f"producer-{index}", client_log)
        self.partitions, self.rate, self.history = partitions, rate, history
        self.sent = 0
        self.instances = 0
        self._stop = threading.Event()
        self._fatal = threading.Event()
        self._p = self._new_producer()
        self._thread = threading.Thread(target=self._run, name=f"producer-{index}", daemon=True)

    def _new_producer(self) -> Producer:
        self.instances += 1
        conf = {
            "bootstrap.servers": self.bootstrap,
            "client.id": f"faults-producer-{self.index}",
            "acks": "all",
            "enable.idempotence": True,
            "linger.ms": 5,
            # Long enough that faults delay deliveries rather than fail them.
            "message.timeout.ms": 300000,
            "socket.timeout.ms": 10000,
            "topic.metadata.refresh.interval.ms": 1000,
            "error_cb": self._on_error,
            "log_level": 3,  # errors only: disconnections are what the faults are for
        }
        if self.client_log is not None:
            # The idempotence state machine's own account (epoch bumps and their reasons,
            # sequence errors): what tells a broker's duplicate from the client's re-send.
            conf.update({"debug": "eos", "log_level": 7, "logger": self.client_log})
        return Producer(conf)

    def _on_error(self, err: KafkaError) -> None:
        if err.fatal():
            self.history.add("client_errors", (time.monotonic(), f"producer-{self.index}",
                                               f"fatal: {err}"))
            self._fatal.set()

    def _report(self, seq: int):
        def cb(err, msg):
            t = time.monotonic()
            if err is None:
                self.history.add("acked", (self.index, seq, msg.value(), msg.partition(),
                                           msg.offset(), t))
            else:
                self.history.add("failed", (self.index, seq, msg.value(), msg.partition(),
                                            err.name(), t))
        return cb

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        interval = 1.0 / self.rate
        next_at = time.monotonic()
        while not self._stop.is_set():
            if self._fatal.is_set():
                # A fatal idempotence error leaves the producer unusable: report what it
                # still holds as failed, and go on with a new producer (a new producer id).
                try:
                    self._p.flush(30)
                except KafkaException:
                    pass
                self._fatal.clear()
                self._p = self._new_producer()
                self.history.add("client_errors", (time.monotonic(), f"producer-{self.index}",
                                                   "replaced after a fatal error"))
            now = time.monotonic()
            if now >= next_at:
                seq = self.sent
                try:
                    self._p.produce(self.topic, value=make_value(self.index, seq),
                                    partition=seq % self.partitions, on_delivery=self._report(seq))
                    self.sent += 1
                    next_at += interval
                    if next_at < now - 1.0:  # do not burst to catch up after a stall
                        next_at = now
                except BufferError:
                    pass
                except KafkaException as e:
                    self.history.add("client_errors", (now, f"producer-{self.index}",
                                                       f"produce: {e}"))
                    self._fatal.set()
            try:
                self._p.poll(min(0.05, max(0.0, next_at - time.monotonic())))
            except KafkaException as e:  # a fatal error surfaces here too
                self.history.add("client_errors", (time.monotonic(), f"producer-{self.index}",
                                                   f"poll: {e}"))
                self._fatal.set()

    def stop(self, flush_timeout: float) -> int:
        """Stop sending; wait for every outstanding delivery report. Returns how many are
        still unknown after flush_timeout."""
        self._stop.set()
        self._thread.join(30)
        try:
            return self._p.flush(flush_timeout)
        except KafkaException as e:
            self.history.add("client_errors", (time.monotonic(), f"producer-{self.index}",
                                               f"flush: {e}"))
            return len(self._p)


class GroupConsumer:
    """One member of a consumer group: reads, records, then commits synchronously."""

    def __init__(self, bootstrap: str, topic: str, group: str, history: History):
        self.topic, self.group, self.history = topic, group, history
        self.bootstrap = bootstrap
        self._stop = threading.Event()
        self.last_commit: dict[int, int] = {}
        self._c = Consumer({
            "bootstrap.servers": bootstrap,
            "client.id": "faults-consumer",
            "group.id": group,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "session.timeout.ms": 10000,
            "heartbeat.interval.ms": 1000,
            "socket.timeout.ms": 10000,
            "topic.metadata.refresh.interval.ms": 1000,
            "error_cb": self._on_error,
            "log_level": 3,  # errors only: disconnections are what the faults are for
        })
        self._thread = threading.Thread(target=self._run, name="consumer", daemon=True)

    def _on_error(self, err: KafkaError) -> None:
        if err.fatal():
            self.history.add("client_errors", (time.monotonic(), "consumer", f"fatal: {err}"))

    def start(self) -> None:
        self._c.subscribe([self.topic])
        self._thread.start()

    def _run(self) -> None:
        next_check = time.monotonic() + 5
        while not self._stop.is_set():
            try:
                msgs = self._c.consume(200, 0.5)
            except KafkaException as e:
                self.history.add("client_errors", (time.monotonic(), "consumer", f"consume: {e}"))
                time.sleep(0.5)
                continue
            got = False
            for m in msgs:
                if m.error() is not None:
                    if m.error().code() != KafkaError._PARTITION_EOF:
                        self.history.add("client_errors", (time.monotonic(), "consumer",
                                                           f"message: {m.error()}"))
                    continue
                self.history.add("reads", (m.partition(), m.offset(), m.value(), time.monotonic()))
                got = True
            if got:
                self._commit()
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + 5
                self._observe()

    def _commit(self) -> None:
        try:
            res = self._c.commit(asynchronous=False)
        except KafkaException as e:
            self.history.add("failed_commits", (time.monotonic(), str(e)))
            return
        offsets = {tp.partition: tp.offset for tp in res or [] if tp.error is None and tp.offset >= 0}
        errors = [str(tp.error) for tp in res or [] if tp.error is not None]
        if errors:
            self.history.add("failed_commits", (time.monotonic(), "; ".join(errors)))
        if offsets:
            self.history.add("commits", (time.monotonic(), offsets))
            self.last_commit.update(offsets)

    def _observe(self) -> None:
        """Read the group's committed offsets back from the coordinator."""
        try:
            assigned = self._c.assignment()
            if not assigned:
                return
            res = self._c.committed([TopicPartition(self.topic, tp.partition) for tp in assigned],
                                    timeout=10)
        except KafkaException:
            return  # not knowing is not a violation
        offsets = {tp.partition: tp.offset for tp in res if tp.error is None and tp.offset >= 0}
        if offsets:
            self.history.add("observed_commits", (time.monotonic(), offsets))

    def caught_up(self, ends: dict[int, int]) -> bool:
        return all(self.last_commit.get(p, 0) >= end for p, end in ends.items())

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)
        try:
            self._c.close()
        except (KafkaException, RuntimeError) as e:
            self.history.add("client_errors", (time.monotonic(), "consumer", f"close: {e}"))


ABORTED_PREFIX = b"aborted-"


class TxnCopier:
    """A Kafka client's exactly-once loop (confluent-kafka, KIP-447 style): a consumer group
    member reads the queue, and a transactional producer copies each batch to another topic,
    same partition, committing the batch's offsets in the same transaction. Every
    `abort_every`-th transaction is aborted on purpose, with a marker value `aborted-<n>` in
    it, and the batch is copied again from the committed offsets. A failed transaction is
    aborted too (a fatal error replaces the producer, which fences the old one), so the
    copy holds each value once, read_committed, and never a marker.

    The loop runs in a child process (`python workload.py txn-copier ...`, see `CopierLoop`),
    which reports what it is told as JSON lines and says when each blocking call starts and
    ends. A call still running HUNG_AFTER_S after it began (librdkafka's calls can outlive
    their timeout: its issues #5456 and #5511) gets the child killed and a new one started,
    whose producer fences the old one's and aborts what it left open, as an application
    restarted by its supervisor would be."""

    TXN_ID = "faults-txn-copier"
    # The longest call is given 30 s; a minute more is a hang.
    HUNG_AFTER_S = 90.0

    def __init__(self, bootstrap: str, source: str, target: str, group: str, history: History,
                 abort_every: int = 7):
        self.args = [bootstrap, source, target, group, str(abort_every)]
        self.history = history
        self.transactions = 0
        self.restarts = 0
        self._stop = threading.Event()
        self._child: subprocess.Popen | None = None
        self._call: tuple[str, float] | None = None  # the child's blocking call, and its start
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._supervise, name="txn-copier", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _spawn(self) -> subprocess.Popen:
        child = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "txn-copier", *self.args,
             str(self.transactions)],
            stdout=subprocess.PIPE, text=True)
        threading.Thread(target=self._read, args=(child,), name="txn-copier-reader",
                         daemon=True).start()
        return child

    def _read(self, child: subprocess.Popen) -> None:
        for line in child.stdout:
            event = json.loads(line)
            with self._lock:
                if "call" in event:
                    if child is self._child:  # not a killed child's last words
                        self._call = (event["call"], event["t"]) if event["call"] else None
                    continue
                if event["k"] == "txns":
                    self.transactions = max(self.transactions, event["v"][1])
            self.history.add(event["k"], tuple(event["v"]))

    def _supervise(self) -> None:
        with self._lock:
            self._child = self._spawn()
        while not self._stop.wait(1.0):
            with self._lock:
                child, call = self._child, self._call
            if call is not None and time.monotonic() - call[1] > self.HUNG_AFTER_S:
                child.kill()
                child.wait()
                self.restarts += 1
                self.history.add("client_errors", (
                    time.monotonic(), "txn-copier",
                    f"{call[0]} still running after {time.monotonic() - call[1]:.0f}s: "
                    f"killed and started again"))
                with self._lock:
                    self._call = None
                    self._child = self._spawn()
            elif child.poll() is not None:
                self.history.add("client_errors", (time.monotonic(), "txn-copier",
                                                   f"exited with {child.returncode}; started again"))
                with self._lock:
                    self._child = self._spawn()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        with self._lock:
            child = self._child
        if child is None:
            return
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(120)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
            self.history.add("client_errors", (time.monotonic(), "txn-copier",
                                               "did not stop within 120s: killed"))


class CopierLoop:
    """The transactional copier's loop, in the child process: events go to stdout as JSON lines
    ({"k": history list, "v": item}, and {"call": name or null, "t": start} around each
    blocking call)."""

    def __init__(self, bootstrap: str, source: str, target: str, group: str, abort_every: int,
                 first: int):
        self.source, self.target, self.abort_every = source, target, abort_every
        self.bootstrap = bootstrap
        self.transactions = first
        self._stop = threading.Event()
        self._c = Consumer({
            "bootstrap.servers": bootstrap,
            "client.id": "faults-txn-copier",
            "group.id": group,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
            "session.timeout.ms": 10000,
            "heartbeat.interval.ms": 1000,
            "socket.timeout.ms": 10000,
            "topic.metadata.refresh.interval.ms": 1000,
            "log_level": 3,
        })
        self._p: Producer | None = None

    @staticmethod
    def _emit(event: dict) -> None:
        sys.stdout.write(json.dumps(event) + "\n")
        sys.stdout.flush()

    def _note(self, kind: str, item: tuple) -> None:
        self._emit({"k": kind, "v": list(item)})

    def _error(self, what: str) -> None:
        self._note("client_errors", (time.monotonic(), "txn-copier", what))

    def _blocking(self, name: str, op):
        self._emit({"call": name, "t": time.monotonic()})
        try:
            return op()
        finally:
            self._emit({"call": None, "t": time.monotonic()})

    def _producer(self) -> Producer:
        """A transactional producer with its id initialised; retried until it is (or stop)."""
        while not self._stop.is_set():
            p = Producer({
                "bootstrap.servers": self.bootstrap,
                "client.id": "faults-txn-copier",
                "transactional.id": TxnCopier.TXN_ID,
                "linger.ms": 5,
                "transaction.timeout.ms": 60000,
                "message.timeout.ms": 55000,
                "socket.timeout.ms": 10000,
                "topic.metadata.refresh.interval.ms": 1000,
                "log_level": 3,
            })
            try:
                self._blocking("init_transactions", lambda: p.init_transactions(30))
                return p
            except KafkaException as e:
                self._error(f"init_transactions: {e}")
                time.sleep(1)
        raise InterruptedError

    def run(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: self._stop.set())
        self._c.subscribe([self.source])
        try:
            self._p = self._producer()
            while not self._stop.is_set():
                msgs = [m for m in self._c.consume(500, 0.5) if m.error() is None]
                if msgs:
                    self._copy(msgs)
        except InterruptedError:
            pass
        self._p = None  # the producer goes with its last reference
        try:
            self._c.close()
        except (KafkaException, RuntimeError) as e:
            self._error(f"close: {e}")

    def _copy(self, msgs) -> None:
        self.transactions += 1
        on_purpose = self.transactions % self.abort_every == 0
        offsets: dict[int, int] = {}
        for m in msgs:
            offsets[m.partition()] = m.offset() + 1

        def outcome(what: str) -> None:
            self._note("txns", (time.monotonic(), self.transactions, what, len(msgs)))

        try:
            self._p.begin_transaction()
            for m in msgs:
                self._produce(m.value(), m.partition())
            if on_purpose:
                self._produce(ABORTED_PREFIX + str(self.transactions).encode(), msgs[0].partition())
                self._blocking("flush", lambda: self._p.flush(30))  # the marker, before the abort
                self._retry("abort_transaction", lambda: self._p.abort_transaction(30))
                outcome("aborted")
                self._rewind()
                return
            self._retry("send_offsets_to_transaction", lambda: self._p.send_offsets_to_transaction(
                [TopicPartition(self.source, p, o) for p, o in sorted(offsets.items())],
                self._c.consumer_group_metadata(), 30))
            self._retry("commit_transaction", lambda: self._p.commit_transaction(30))
            outcome("committed")
        except KafkaException as e:
            err = e.args[0]
            outcome(f"failed: {err}")
            if err.fatal() or not self._abort():
                # A new producer with the same transactional id fences this one and aborts
                # whatever it left open.
                self._p = self._producer()
            self._rewind()

    def _produce(self, value: bytes, partition: int) -> None:
        while True:
            try:
                self._p.produce(self.target, value=value, partition=partition)
                return
            except BufferError:
                self._p.poll(0.1)

    def _retry(self, name: str, op, budget_s: float = 60.0) -> None:
        """Run a transactional call again while it fails with a retriable error."""
        deadline = time.monotonic() + budget_s
        while True:
            try:
                return self._blocking(name, op)
            except KafkaException as e:
                if not e.args[0].retriable() or time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def _abort(self) -> bool:
        try:
            self._retry("abort_transaction", lambda: self._p.abort_transaction(30))
            return True
        except KafkaException as e:
            self._error(f"abort_transaction: {e}")
            return False

    def _rewind(self) -> None:
        """Go back to the group's committed offsets: what the last committed transaction
        recorded (read with require_stable, so a pending one is waited for)."""
        while not self._stop.is_set():
            try:
                assigned = self._c.assignment()
                committed = self._blocking("committed",
                                           lambda: self._c.committed(assigned, timeout=30))
                for tp in committed:
                    if tp.offset < 0:
                        tp.offset = OFFSET_BEGINNING
                    self._c.seek(tp)
                return
            except KafkaException as e:
                self._error(f"rewind: {e}")
                time.sleep(1)


class CommittedReader:
    """Reads a topic read_committed from the beginning, without a group, while the faults
    run: what it sees must be committed for good (no aborted or later-undone reads)."""

    def __init__(self, bootstrap: str, topic: str, partitions: int, history: History):
        self.history = history
        self._stop = threading.Event()
        self._c = Consumer({
            "bootstrap.servers": bootstrap,
            "client.id": "faults-committed-reader",
            "group.id": "faults-committed-reader",  # never joined: the partitions are assigned
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "socket.timeout.ms": 10000,
            "topic.metadata.refresh.interval.ms": 1000,
            "log_level": 3,
        })
        self._c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
        self._thread = threading.Thread(target=self._run, name="committed-reader", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                msgs = self._c.consume(500, 0.5)
            except KafkaException:
                time.sleep(0.5)
                continue
            for m in msgs:
                if m.error() is None:
                    self.history.add("txn_live_reads", (m.partition(), m.offset(), m.value(),
                                                        time.monotonic()))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        try:
            self._c.close()
        except (KafkaException, RuntimeError):
            pass


class LineWriter:
    """Appends lines `line-<seq>` to a file, `rate` a second, for a pipeline's file source."""

    def __init__(self, path, rate: float, history: History):
        self.path, self.rate, self.history = path, rate, history
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="line-writer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        seq = 0
        with open(self.path, "a") as f:
            while not self._stop.wait(1.0 / self.rate):
                line = f"line-{seq:08d}"
                f.write(line + "\n")
                f.flush()
                self.history.add("file_lines", line.encode())
                seq += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


if __name__ == "__main__":
    # python workload.py txn-copier BOOTSTRAP SOURCE TARGET GROUP ABORT_EVERY FIRST
    if len(sys.argv) != 8 or sys.argv[1] != "txn-copier":
        sys.exit("usage: workload.py txn-copier BOOTSTRAP SOURCE TARGET GROUP ABORT_EVERY FIRST")
    bootstrap, source, target, group, abort_every, first = sys.argv[2:]
    CopierLoop(bootstrap, source, target, group, int(abort_every), int(first)).run()
