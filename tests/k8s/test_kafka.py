"""Strimzi resources agree with the code: topics with topics.py, ACLs with what each stage does."""

from __future__ import annotations

import re
from typing import Any

import pytest

from devtools.k8s import manifests, sync
from devtools.k8s.manifests import Obj
from services.common import topics

PROD_REPLICAS = 3
PROD_MIN_ISR = 2


def _kafka(docs: list[Obj]) -> Obj:
    (kafka,) = manifests.by_kind(docs, "Kafka").values()
    return kafka


def test_kafka_topics_match_topics_py(docs: list[Obj], overlay: str) -> None:
    found = {t["spec"]["topicName"]: t for t in manifests.by_kind(docs, "KafkaTopic").values()}
    assert set(found) == {t.name for t in topics.ALL}
    for t in topics.ALL:
        spec = found[t.name]["spec"]
        assert spec["partitions"] == t.partitions, t.name
        # prod: acks=all needs two in-sync copies of every declared topic (set per topic: see
        # test_reply_topics_can_be_written for why not broker-wide).
        extra = {} if overlay == "dev" else {"min.insync.replicas": str(PROD_MIN_ISR)}
        assert {k: str(v) for k, v in spec["config"].items()} == {**t.configs, **extra}, t.name
        # dev: exactly topics.py's replication; prod: three copies on three brokers.
        assert spec["replicas"] == (t.replication if overlay == "dev" else max(t.replication, PROD_REPLICAS))
        assert int(spec["config"].get("min.insync.replicas", 1)) < spec["replicas"] or overlay == "dev"
        assert found[t.name]["metadata"]["labels"]["strimzi.io/cluster"] == manifests.KAFKA_CLUSTER


def test_reply_topics_are_left_to_the_gateway(docs: list[Obj]) -> None:
    assert sync.REPLIES_PREFIX == topics.REPLY_PREFIX
    assert not [t for t in manifests.by_kind(docs, "KafkaTopic").values()
                if t["spec"]["topicName"].startswith(topics.REPLY_PREFIX)]
    (gateway,) = [u for u in manifests.by_kind(docs, "KafkaUser").values()
                  if u["metadata"]["name"] == "colloquy-gateway"]
    rules = _rules(gateway)
    assert {"Create", "Read", "Describe"} <= rules[("topic", topics.REPLY_PREFIX, "prefix")]


def test_reply_topics_can_be_written(docs: list[Obj]) -> None:
    """The gateway creates its reply topic at run time with topics.py's replication; the broker's
    default min.insync.replicas applies to it, and acks=all producers (kafka_loop.make_producer)
    get NOT_ENOUGH_REPLICAS on every reply when that default exceeds the replication."""
    config = _kafka(docs)["spec"]["kafka"]["config"]
    assert config["min.insync.replicas"] <= topics.reply_topic("gateway-0").replication


def test_kraft_cluster_with_authenticated_listener(docs: list[Obj], overlay: str) -> None:
    kafka = _kafka(docs)
    assert "zookeeper" not in kafka["spec"]
    pools = list(manifests.by_kind(docs, "KafkaNodePool").values())
    assert all(p["metadata"]["labels"]["strimzi.io/cluster"] == kafka["metadata"]["name"] for p in pools)
    roles = [r for p in pools for r in p["spec"]["roles"] for _ in range(p["spec"]["replicas"])]
    controllers, brokers = roles.count("controller"), roles.count("broker")
    assert controllers % 2 == 1, "a KRaft quorum needs an odd number of controllers"
    assert (controllers, brokers) == ((1, 1) if overlay == "dev" else (3, 3))
    (listener,) = kafka["spec"]["kafka"]["listeners"]
    assert listener["tls"] and listener["authentication"]["type"] == "scram-sha-512" and listener["port"] == 9093
    assert kafka["spec"]["kafka"]["authorization"]["type"] == "simple"
    config = kafka["spec"]["kafka"]["config"]
    assert config["auto.create.topics.enable"] is False
    # Internal and default replication must fit the brokers, or transactions never initialise.
    for key in ("offsets.topic.replication.factor", "transaction.state.log.replication.factor",
                "default.replication.factor"):
        assert config[key] <= brokers, key
    assert config["transaction.state.log.min.isr"] <= config["transaction.state.log.replication.factor"]
    if overlay == "prod":  # survive one broker down with acks=all
        assert config["min.insync.replicas"] < config["default.replication.factor"]
        assert config["transaction.state.log.min.isr"] < config["transaction.state.log.replication.factor"]
    topic_replicas = {t["spec"]["replicas"] for t in manifests.by_kind(docs, "KafkaTopic").values()}
    assert max(topic_replicas) <= brokers


def _rules(user: Obj) -> dict[tuple[str, str, str], set[str]]:
    out: dict[tuple[str, str, str], set[str]] = {}
    for acl in user["spec"]["authorization"]["acls"]:
        assert acl.get("type", "allow") == "allow"
        res = acl["resource"]
        # A `cluster` resource has no name (Strimzi: the one cluster, "kafka-cluster" in Kafka).
        key = (res["type"], res.get("name", ""), res.get("patternType", "literal"))
        out.setdefault(key, set()).update(acl["operations"])
    return out


def allowed(user: Obj, resource: str, name: str, op: str) -> bool:
    """Whether `user`'s ACLs allow `op` on the resource, as Kafka matches them: a literal name,
    a prefix, or the literal wildcard `*`."""
    for (rtype, rname, pattern), ops in _rules(user).items():
        matches = rname in (name, "*") if pattern == "literal" else name.startswith(rname)
        if rtype == resource and op in ops and matches:
            return True
    return False


def _users(docs: list[Obj]) -> dict[str, Obj]:
    return manifests.by_kind(docs, "KafkaUser")


def test_one_user_per_service_with_scram(docs: list[Obj]) -> None:
    users = _users(docs)
    # One per service, plus the hanging-transaction janitor's (tests/k8s/test_txn_janitor.py).
    assert set(users) == {a.user for a in sync.access()} | {sync.JANITOR_USER}
    for user in users.values():
        assert user["spec"]["authentication"]["type"] == "scram-sha-512"
        assert user["metadata"]["labels"]["strimzi.io/cluster"] == manifests.KAFKA_CLUSTER


# (service, ConfigMap variable, operation on the topic it names)
CONFIGURED_TOPICS = [
    ("tokenizer", "TOKENIZER_TOPIC_IN", "Read"), ("moderation", "MODERATION_INPUT_TOPIC_IN", "Read"),
    ("prompt", "PROMPT_TOPIC_IN", "Read"), ("prompt", "PROMPT_TOPIC_OUT", "Write"),
    ("generation", "GENERATION_TOPIC_IN", "Read"), ("generation", "GENERATION_TOPIC_CANCELS", "Read"),
    ("generation", "GENERATION_TOPIC_OUT", "Write"),
    ("conversation", "CONVERSATION_TOPIC", "Read"),
]
CONFIGURED_GROUPS = [("tokenizer", "TOKENIZER_GROUP_ID"), ("prompt", "PROMPT_GROUP_ID"),
                     ("generation", "GENERATION_GROUP_ID"), ("moderation", "MODERATION_INPUT_GROUP"),
                     ("moderation", "MODERATION_OUTPUT_GROUP")]


def _config_value(docs: list[Obj], var: str) -> str:
    values = {cm["data"][var] for cm in manifests.by_kind(docs, "ConfigMap").values() if var in cm.get("data", {})}
    assert len(values) == 1, f"{var}: {values}"
    return values.pop()


def test_the_tokenizer_in_the_chain_needs_no_new_acls(docs: list[Obj]) -> None:
    """TOKENIZER_TOPIC_OUT is empty (beside the path); setting it and MODERATION_INPUT_TOPIC_IN to
    chat.tokenized puts the tokenizer back in front of input moderation with the same users."""
    assert _config_value(docs, "TOKENIZER_TOPIC_OUT") == ""
    users = _users(docs)
    assert allowed(users["colloquy-tokenizer"], "topic", topics.CHAT_TOKENIZED.name, "Write")
    assert allowed(users["colloquy-moderation"], "topic", topics.CHAT_TOKENIZED.name, "Read")


@pytest.mark.parametrize(("service", "var", "op"), CONFIGURED_TOPICS)
def test_configured_topics_are_allowed(docs: list[Obj], service: str, var: str, op: str) -> None:
    topic = _config_value(docs, var)
    user = _users(docs)[f"colloquy-{service}"]
    assert allowed(user, "topic", topic, op) and allowed(user, "topic", topic, "Describe")


@pytest.mark.parametrize(("service", "var"), CONFIGURED_GROUPS)
def test_configured_groups_and_transactional_ids_are_allowed(docs: list[Obj], service: str, var: str) -> None:
    group = _config_value(docs, var)
    user = _users(docs)[f"colloquy-{service}"]
    assert allowed(user, "group", group, "Read")
    # kafka_loop.StageWorker: transactional id "<group>-<instance>"
    assert allowed(user, "transactionalId", f"{group}-{service}-0", "Write")


def test_conversation_consumes_in_its_group_without_transactions(docs: list[Obj]) -> None:
    """The materializer stores its offsets in the database: a consumer group (partitions split
    between replicas) but no Kafka transactions, so its user gets no transactional id."""
    user = _users(docs)["colloquy-conversation"]
    assert allowed(user, "group", _config_value(docs, "CONVERSATION_GROUP_ID"), "Read")
    assert not any(acl["resource"]["type"] == "transactionalId" for acl in user["spec"]["authorization"]["acls"])
    assert allowed(user, "topic", topics.DEAD_LETTER.name, "Write")
    # Deletions (retention, late turns of a deleted conversation): tombstones and the feedback erasure.
    assert allowed(user, "topic", topics.CONVERSATION_TURNS.name, "Write")
    assert allowed(user, "topic", topics.CHAT_FEEDBACK.name, "Write")


def test_every_stage_may_dead_letter(docs: list[Obj]) -> None:
    for a in sync.access():
        if a.group:
            assert allowed(_users(docs)[a.user], "topic", topics.DEAD_LETTER.name, "Write"), a.user


def _readme_rows() -> list[tuple[str, str, str]]:
    text = (manifests.ROOT / "services" / "README.md").read_text(encoding="utf-8")
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0] and not cells[0].startswith(("stage", "-", "`")):
            rows.append((cells[0], cells[1], cells[2]))
    return rows


def _topics_in(cell: str) -> set[str]:
    names = {t.name for t in topics.ALL}
    found = set(re.findall(r"`([^`]+)`", cell))
    out = {f for f in found if f in names}
    if any(f.startswith(topics.REPLY_PREFIX) for f in found) or re.search(r"\breply\b", cell):
        out.add(topics.REPLY_PREFIX + "*")
    return out


def _may(user: Obj, topic: str, op: str) -> bool:
    if topic.endswith("*"):
        return allowed(user, "topic", topic[:-1] + "any-gateway", op)
    return allowed(user, "topic", topic, op)


def test_acls_cover_services_readme_table(render) -> None:  # type: ignore[no-untyped-def]
    """services/README.md's stage table (consumes / produces) is allowed by each KafkaUser."""
    users = _users(render("dev"))
    rows = _readme_rows()
    assert len(rows) >= 6, "services/README.md's stage table moved: update _readme_rows"
    problems: list[Any] = []
    for stage, consumes, produces in rows:
        user = users[f"colloquy-{stage.split()[0]}"]
        problems += [f"{stage} reads {t}" for t in _topics_in(consumes) if not _may(user, t, "Read")]
        problems += [f"{stage} writes {t}" for t in _topics_in(produces) if not _may(user, t, "Write")]
    assert not problems, "KafkaUser ACLs lack: " + ", ".join(problems)
