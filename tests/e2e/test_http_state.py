"""Topics, consumer groups and transactions as JSON over the HTTP API (`GET /topics`,
`/groups`, `/transactions`), checked against what real clients did."""

from __future__ import annotations

import requests
from confluent_kafka import Consumer, Producer

from support import create_topic, wait_until
from test_metrics import consume_and_commit, produce


def get(weir, path: str, status: int = 200) -> dict:
    r = requests.get(f"{weir.http_url}{path}", timeout=10)
    assert r.status_code == status, (path, r.status_code, r.text)
    return r.json()


def test_topics_groups_and_transactions_as_json(weir):
    create_topic(weir.bootstrap, "orders", 2, config={"retention.ms": "3600000"})
    produce(weir.bootstrap, "orders", 300, 2)
    consume_and_commit(weir.bootstrap, "orders", "billing", 300)
    produce(weir.bootstrap, "orders", 10, 2, start=300)
    tp = Producer({"bootstrap.servers": weir.bootstrap, "transactional.id": "json-txn"})
    tp.init_transactions(30)
    tp.begin_transaction()
    tp.produce("orders", value=b"t", partition=1)
    assert tp.flush(30) == 0

    topics = {t["name"]: t for t in get(weir, "/topics")["topics"]}
    assert topics["orders"]["internal"] is False and topics["__consumer_offsets"]["internal"]
    parts = topics["orders"]["partitions"]
    assert [p["log_end_offset"] for p in parts] == [155, 156]
    assert [p["high_watermark"] for p in parts] == [155, 156]
    # The open transaction holds the last stable offset back on partition 1.
    assert [p["last_stable_offset"] for p in parts] == [155, 155]
    assert topics["orders"]["size_bytes"] == sum(p["size_bytes"] for p in parts) > 0
    one = get(weir, "/topics/orders")
    assert one["configs"] == {"retention.ms": "3600000"}
    assert "no topic named 'nope'" in get(weir, "/topics/nope", 404)["error"]

    groups = get(weir, "/groups")
    assert groups["coordinator"] is True
    billing = next(g for g in groups["groups"] if g["group"] == "billing")
    assert billing["state"] == "Empty" and billing["members"] == []
    assert billing["lag"] == 11, billing  # 10 records and one open transactional record
    assert sorted((o["partition"], o["committed"], o["lag"]) for o in billing["offsets"]) == \
        [(0, 150, 5), (1, 150, 6)]
    assert get(weir, "/groups/billing")["lag"] == 11
    get(weir, "/groups/nope", 404)

    txns = {t["transactional_id"]: t for t in get(weir, "/transactions")["transactions"]}
    assert txns["json-txn"]["state"] == "Ongoing", txns
    assert txns["json-txn"]["partitions"] == [{"topic": "orders", "partition": 1}]
    tp.commit_transaction(30)
    txns = {t["transactional_id"]: t for t in get(weir, "/transactions")["transactions"]}
    assert txns["json-txn"]["state"] == "CompleteCommit", txns


def test_reset_a_group_over_http(weir):
    """POST /groups/{id}/reset-offsets moves an empty group's offsets as `weir group
    reset-offsets` does; a group with members, or a bad target, is refused with the reason."""
    create_topic(weir.bootstrap, "orders", 2)
    produce(weir.bootstrap, "orders", 100, 2)
    consume_and_commit(weir.bootstrap, "orders", "billing", 100)
    url = f"{weir.http_url}/groups/billing/reset-offsets"

    def offsets():
        return sorted((o["partition"], o["committed"]) for o in get(weir, "/groups/billing")["offsets"])

    r = requests.post(url, json={"topic": "orders", "to": "earliest"}, timeout=30)
    assert r.status_code == 200 and r.json()["offsets"] == {"0": 0, "1": 0}, r.text
    assert offsets() == [(0, 0), (1, 0)]
    r = requests.post(url, json={"topic": "orders", "to": "offset", "offset": 30}, timeout=30)
    assert r.status_code == 200, r.text
    assert offsets() == [(0, 30), (1, 30)]
    r = requests.post(url, json={"topic": "orders", "to": "latest"}, timeout=30)
    assert r.status_code == 200 and offsets() == [(0, 50), (1, 50)], r.text
    for body in ({"topic": "orders", "to": "sideways"}, {"topic": "orders", "to": "offset"}, {"to": "latest"}):
        r = requests.post(url, json=body, timeout=30)
        assert r.status_code == 400, (body, r.text)

    member = Consumer({"bootstrap.servers": weir.bootstrap, "group.id": "billing", "session.timeout.ms": 10000})
    try:
        member.subscribe(["orders"])
        wait_until(lambda: member.poll(0.2) is None and bool(member.assignment()), 30,
                   message="the consumer to join")
        r = requests.post(url, json={"topic": "orders", "to": "earliest"}, timeout=30)
        assert r.status_code == 409 and "not empty" in r.json()["error"], r.text
    finally:
        member.close()
