"""The hanging-transaction janitor (services/common/transactions.py) on Kubernetes.

Locally every stage process sweeps in a background thread; here the services' KafkaUsers lack
the rights a sweep needs, so colloquy-common turns the sweeps off and the `kafka-txn-janitor`
CronJob (k8s/base/kafka/txn-janitor.yaml) runs `python -m services.common.transactions` with its
own KafkaUser, `txn-janitor`, whose ACLs (devtools/k8s/sync.py janitor_acls()) are checked here
against what the module asks Kafka for.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from devtools.k8s import manifests, sync
from devtools.k8s.manifests import EnvValue, Obj, PodTemplate
from services.common import config as common_config
from services.common import topics, transactions
from tests.k8s.test_config_keys import env_names, resolve
from tests.k8s.test_kafka import _rules, allowed
from tests.k8s.test_policy import _applying

CRONJOB = "kafka-txn-janitor"
MODULE = "services.common.transactions"
SCHEDULE_PERIOD_S = 120


def _cronjob(docs: list[Obj]) -> Obj:
    return manifests.by_kind(docs, "CronJob")[CRONJOB]


def _janitor(docs: list[Obj]) -> tuple[PodTemplate, dict[str, Any], dict[str, EnvValue]]:
    (pt,) = [p for p in manifests.all_pod_templates(docs) if p.owner == f"CronJob/{CRONJOB}"]
    (container,) = pt.containers()
    configmaps = manifests.by_kind(docs, "ConfigMap")
    return pt, container, manifests.effective_env(container, configmaps)


def _janitor_user(docs: list[Obj]) -> Obj:
    return manifests.by_kind(docs, "KafkaUser")[sync.JANITOR_USER]


# -- The services do not sweep -------------------------------------------------------------------


def test_services_do_not_sweep(objects: list[Obj]) -> None:
    """KAFKA_HANGING_TXN_CHECK_S is 0 in every Kafka client but the janitor: their users could
    not sweep (every sweep would fail and count in colloquy_kafka_hanging_transaction_sweeps_failed_total)."""
    assert manifests.by_kind(objects, "ConfigMap")["colloquy-common"]["data"]["KAFKA_HANGING_TXN_CHECK_S"] == "0"
    configmaps = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ConfigMap"}
    clients = []
    for pt in manifests.all_pod_templates(objects):
        if pt.owner == f"CronJob/{CRONJOB}":
            continue
        for c in pt.containers():
            env = manifests.effective_env(c, configmaps)
            if "KAFKA_BOOTSTRAP_SERVERS" not in env:
                continue
            values = resolve(env)
            assert values.get("KAFKA_HANGING_TXN_CHECK_S") == "0", f"{pt.owner}/{c['name']}"
            cfg = common_config.load(common_config.KafkaConfig, environ=values)
            assert cfg.hanging_txn_check_s == 0, f"{pt.owner}/{c['name']}"
            clients.append(f"{pt.owner}/{c['name']}")
    # The stage processes must be among them (the search would otherwise pass vacuously).
    stages = {f"StatefulSet/{s}/{s}" for s in ("gateway", "tokenizer", "moderation", "prompt", "feedback",
                                                "conversation")}
    assert stages | {"RayService/generation:head/kafka-bridge"} <= set(clients), clients


def test_service_users_lack_the_janitors_rights(docs: list[Obj]) -> None:
    """Why the sweeps are off in the services: their users may not abort (ClusterAction) nor see
    other stages' transactions. Keep it that way; the janitor's user is the only one with them."""
    users = manifests.by_kind(docs, "KafkaUser")
    for a in sync.access():
        user = users[a.user]
        assert not allowed(user, "cluster", "", "ClusterAction"), a.user
        assert not allowed(user, "transactionalId", "colloquy-some-other-stage-0", "Describe"), a.user


# -- The janitor's KafkaUser ---------------------------------------------------------------------


def test_janitor_user_may_abort_and_see_every_transaction(docs: list[Obj]) -> None:
    user = _janitor_user(docs)
    assert user["spec"]["authentication"]["type"] == "scram-sha-512"
    assert user["metadata"]["labels"]["strimzi.io/cluster"] == manifests.KAFKA_CLUSTER
    # WriteTxnMarkers (abort_transaction) needs ClusterAction on the cluster.
    assert {"ClusterAction", "Describe"} <= _rules(user)[("cluster", "", "literal")]
    # ListTransactions/DescribeTransactions only return the ids the caller may describe: all of them.
    assert "Describe" in _rules(user)[("transactionalId", "*", "literal")]
    for stage in ("tokenizer", "moderation", "prompt", "generation", "anything-else"):
        assert allowed(user, "transactionalId", f"colloquy-{stage}-{stage}-0", "Describe"), stage


def test_janitor_user_may_read_every_watched_topic(docs: list[Obj]) -> None:
    """Describe + Read (DescribeProducers) on whatever transactions.watched_topics() sweeps."""
    assert sync.OFFSETS_TOPIC == transactions.OFFSETS_TOPIC
    assert sync.REPLIES_PREFIX == topics.REPLY_PREFIX
    cluster = [t.name for t in topics.ALL] + [topics.reply_topic("gateway-0").name,
                                              topics.reply_topic("gateway-7").name,
                                              transactions.OFFSETS_TOPIC, "__transaction_state", "someone-elses"]
    watched = transactions.watched_topics(cluster)
    assert {topics.reply_topic("gateway-0").name, transactions.OFFSETS_TOPIC} <= set(watched)
    assert {t.name for t in topics.ALL} <= set(watched)
    user = _janitor_user(docs)
    missing = [f"{op} {t}" for t in watched for op in ("Describe", "Read") if not allowed(user, "topic", t, op)]
    assert not missing, "KafkaUser txn-janitor lacks: " + ", ".join(missing)


def test_janitor_user_has_nothing_more(docs: list[Obj]) -> None:
    """Read-only but for the abort: no Write, Create, Delete, Alter; no consumer groups."""
    for (rtype, name, _), ops in _rules(_janitor_user(docs)).items():
        allowed_ops = {"topic": {"Describe", "Read"}, "transactionalId": {"Describe"},
                       "cluster": {"Describe", "ClusterAction"}}.get(rtype, set())
        assert ops <= allowed_ops, f"{rtype} {name!r}: {sorted(ops - allowed_ops)}"


def test_janitor_acls_say_why() -> None:
    """users.yaml carries a comment for each group of the janitor's rights (task: keep them)."""
    text = (manifests.K8S / "base" / "kafka" / "users.yaml").read_text(encoding="utf-8")
    janitor = text.split(f"name: {sync.JANITOR_USER}\n", 1)[1]
    for word in ("DescribeProducers", "DescribeTransactions", "ListTransactions", "WriteTxnMarkers",
                 "ClusterAction", "UnstableOffsetCommitError"):
        assert word in janitor, word


# -- The CronJob ---------------------------------------------------------------------------------


def test_janitor_runs_every_two_minutes_one_at_a_time(docs: list[Obj]) -> None:
    spec = _cronjob(docs)["spec"]
    assert spec["schedule"] == "*/2 * * * *"
    assert spec.get("suspend", False) is False
    assert spec["concurrencyPolicy"] == "Forbid"
    assert 1 <= spec["successfulJobsHistoryLimit"] <= 3 and 1 <= spec["failedJobsHistoryLimit"] <= 5
    job = spec["jobTemplate"]["spec"]
    # A stuck run ends before the next one is due.
    assert job["activeDeadlineSeconds"] < SCHEDULE_PERIOD_S
    assert spec.get("startingDeadlineSeconds", 0) <= SCHEDULE_PERIOD_S
    assert job["template"]["spec"]["restartPolicy"] in {"Never", "OnFailure"}


def test_janitor_runs_the_module_from_the_services_image(docs: list[Obj]) -> None:
    _, container, _ = _janitor(docs)
    assert container["command"] == ["python", "-m", MODULE]
    # No args: a sweep that aborts, with KAFKA_HANGING_TXN_AGE_S. Only the module's flags otherwise.
    args = " ".join(container.get("args", []))
    assert re.fullmatch(r"(\s*(--dry-run|--older-than[= ]\d+(\.\d+)?))*\s*", args), args
    # The services: the StatefulSets that are Kafka clients (postgres runs its own image).
    images = {c["image"] for s in manifests.by_kind(docs, "StatefulSet").values()
              if s["spec"]["template"]["metadata"]["labels"].get("colloquy.io/kafka-client") == "true"
              for c in s["spec"]["template"]["spec"]["containers"]}
    assert images == {container["image"]}, "the janitor runs the services' (serving) image"


def test_janitor_connects_to_kafka_like_the_services(docs: list[Obj]) -> None:
    pt, container, env = _janitor(docs)
    values = resolve(env)
    missing = sorted(env_names([common_config.KafkaConfig]) - set(env))
    assert not missing, f"CronJob/{CRONJOB} does not set {missing}"
    cfg = common_config.load(common_config.KafkaConfig, environ=values)
    assert cfg.bootstrap_servers == f"{manifests.KAFKA_CLUSTER}-kafka-bootstrap:9093"
    assert (cfg.security_protocol, cfg.sasl_mechanism) == ("SASL_SSL", "SCRAM-SHA-512")
    assert cfg.sasl_username == sync.JANITOR_USER
    assert env["KAFKA_SASL_PASSWORD"] == EnvValue(secret=(sync.JANITOR_USER, "password"))
    assert cfg.hanging_txn_age_s >= 60  # well beyond a stage's transaction (transaction.timeout.ms 20 s)
    # The CA file is the Strimzi cluster CA, mounted where KAFKA_SSL_CAFILE points.
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(Path(cfg.ssl_cafile).parent))
    volume = next(v for v in pt.spec["volumes"] if v["name"] == mount["name"])
    assert volume["secret"]["secretName"] == f"{manifests.KAFKA_CLUSTER}-cluster-ca-cert"
    assert Path(cfg.ssl_cafile).name in {i["path"] for i in volume["secret"]["items"]}
    # The brokers admit it (networkPolicyPeers) and the kafka-clients policy lets it out.
    assert pt.labels.get("colloquy.io/kafka-client") == "true"


def test_janitor_reaches_only_kafka_dns_and_the_pushgateway(docs: list[Obj]) -> None:
    pt, container, _ = _janitor(docs)
    egress = {p["metadata"]["name"] for p in _applying(docs, pt.labels, "Egress")}
    assert egress == {"default-deny", "allow-dns", "kafka-clients", f"{sync.DIALS_PREFIX}{CRONJOB}"}, egress
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    assert env.get("PUSHGATEWAY_URL") == "http://pushgateway:9091"  # a one-shot run pushes its metrics
    # Nothing may reach it: it listens on nothing, and only default-deny and the metrics-port
    # scrape rule (no such port here) select it.
    ingress = {p["metadata"]["name"] for p in _applying(docs, pt.labels, "Ingress")}
    assert ingress <= {"default-deny", "prometheus-scrape"}, ingress
    assert not container.get("ports")
