"""The RLHF job's replay evaluation in the cluster (issue 21 items 2 and 3): the RayJob runs it,
so its gated canary can start. rlhf/job.py starts a canary only for a child whose manifest
records a passed quality gate AND a passed replay; without --replay the canary never starts.

Both overlays' RayJob templates: the entrypoint asks for both; the head (where the job's driver,
and so the replay, runs) reads the conversation store the materializer writes and dials the
moderation service, and the NetworkPolicies let exactly the head through; the workers get none
of it. The real-PostgreSQL side (the read-only role) is in test_postgres.py.
"""

from __future__ import annotations

import shlex
from typing import Any
from urllib.parse import urlsplit

from devtools.k8s import connectivity, manifests
from devtools.k8s.manifests import Obj, PodTemplate
from rlhf.config import RLHFConfig
from services.common import config as common_config
from services.conversation.config import StoreConfig
from tests.k8s import test_config_keys

HEAD = "RayJob/rlhf-*:head"


def _rlhf_pods(objects: list[Obj]) -> tuple[PodTemplate, list[PodTemplate]]:
    pts = [p for p in manifests.all_pod_templates(objects) if p.owner.startswith("RayJob/rlhf-")]
    (head,) = [p for p in pts if p.owner == HEAD]
    workers = [p for p in pts if p is not head]
    assert workers
    return head, workers


def _env(objects: list[Obj], pt: PodTemplate) -> tuple[dict[str, Any], dict[str, manifests.EnvValue]]:
    (container,) = pt.containers()
    return container, manifests.effective_env(container, manifests.by_kind(objects, "ConfigMap"))


def test_the_job_replays_then_starts_its_canary(objects: list[Obj]) -> None:
    (job,) = [o for o in objects if o["kind"] == "RayJob"]
    args = shlex.split(job["spec"]["entrypoint"])
    assert args[:3] == ["python", "-m", "rlhf.job"], args
    assert "--replay" in args, "no replay: no child records a passed replay, so the canary never starts"
    percent = int(args[args.index("--canary") + 1])
    assert 1 <= percent <= 99
    # Nothing turns the replay off again or points it elsewhere than the store below.
    _, env = _env(objects, _rlhf_pods(objects)[0])
    assert "RLHF_REPLAY" not in env and "RLHF_REPLAY_STORE" not in env


def test_the_head_reads_the_conversation_store_as_the_read_only_role(objects: list[Obj]) -> None:
    """The database the materializer writes (conversation-config's host, port and database), as
    `colloquy_replay` (postgres-init's 20-colloquy-replay.sh: SELECT only; test_postgres runs it on
    a real server), with that role's password from the `postgres` Secret, never in the URL."""
    head, _ = _rlhf_pods(objects)
    _, env = _env(objects, head)
    values = test_config_keys.resolve(env)
    store = urlsplit(common_config.load(StoreConfig, environ=values).url)
    conversation = urlsplit(manifests.by_kind(objects, "ConfigMap")["conversation-config"]["data"]["DATABASE_URL"])
    assert (store.scheme, store.hostname, store.port, store.path) == \
        (conversation.scheme, conversation.hostname, conversation.port, conversation.path)
    assert (store.username, store.password) == ("colloquy_replay", None)
    assert env["PGPASSWORD"].secret == ("postgres", "replay-password")  # no name hash in dev either


def test_the_head_dials_moderation_as_the_gateway_does(objects: list[Obj]) -> None:
    head, _ = _rlhf_pods(objects)
    _, env = _env(objects, head)
    cfg = common_config.load(RLHFConfig, environ=test_config_keys.resolve(env))
    gateway = manifests.by_kind(objects, "ConfigMap")["gateway-config"]["data"]["MODERATION_ADDR"]
    assert cfg.moderation_addr == gateway


def test_only_the_head_may_reach_postgres_and_moderation(objects: list[Obj]) -> None:
    """Both ends (the generated dials-rlhf-ray-head / dialed-* policies): the head in, the
    training workers, which never read the store or moderate, refused."""
    pols = connectivity.policies(objects)
    head, workers = _rlhf_pods(objects)
    sts = manifests.by_kind(objects, "StatefulSet")
    for name, port, port_name in (("postgres", 5432, "postgres"), ("moderation", 50053, "grpc")):
        target = sts[name]["spec"]["template"]["metadata"]["labels"]

        def reaches(src: PodTemplate, target: dict[str, str] = target, port: int = port,
                    port_name: str = port_name) -> bool:
            return (connectivity.admits(pols, src.labels, "Egress", target, port, port_name)
                    and connectivity.admits(pols, target, "Ingress", src.labels, port, port_name))

        assert reaches(head), name
        assert not any(reaches(w) for w in workers), name
