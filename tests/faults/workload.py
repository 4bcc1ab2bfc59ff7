"""The queue workload: idempotent acks=all producers appending unique values, and a consumer
group reading them and committing after processing. Everything the clients are told is kept
in a History for the checkers.

A value is `p<producer>-<seq>` (seq zero-padded); producer k sends its n-th value to
partition n % partitions, so every (producer, partition) pair has its own produce order.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition


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

    def __post_init__(self):
        self.lock = threading.Lock()

    def add(self, name: str, item) -> None:
        with self.lock:
            getattr(self, name).append(item)


class QueueProducer:
    """One idempotent acks=all producer thread sending `rate` values a second."""

    def __init__(self, index: int, bootstrap: str, topic: str, partitions: int, rate: float,
                 history: History):
        self.index, self.bootstrap, self.topic = index, bootstrap, topic
        self.partitions, self.rate, self.history = partitions, rate, history
        self.sent = 0
        self.instances = 0
        self._stop = threading.Event()
        self._fatal = threading.Event()
        self._p = self._new_producer()
        self._thread = threading.Thread(target=self._run, name=f"producer-{index}", daemon=True)

    def _new_producer(self) -> Producer:
        self.instances += 1
        return Producer({
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
        })

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
