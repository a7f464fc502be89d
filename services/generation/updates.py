"""Model rollouts end to end: the CLI that records one and announces it, and the handler that
applies a `model.updates` event to the running Serve application.

    python -m services.generation.updates promote VERSION [--canary PERCENT]
    python -m services.generation.updates rollback        # back to the version served before
    python -m services.generation.updates status

The registry is the durable state (pointer = stable version, canary file = second version and
share), so a restarted generation service comes back serving the same thing; the event makes the
running replicas switch now. Applying is a Serve *user_config* change: Serve calls
`Generation.reconfigure` on every replica in place, no replica restarts, and requests in flight
finish on the model they started with.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Iterable
from typing import Any

from colloquy.v1 import events_pb2

from services.common import events, kafka_loop, topics
from services.common.config import KafkaConfig, load_or_exit
from services.generation import rollout
from services.generation.model_ref import DEPLOYMENT

log = logging.getLogger(__name__)


def registry_state(reg: Any, deployment: str = DEPLOYMENT) -> rollout.RolloutState:
    """What the registry says the deployment serves."""
    version = reg.current(deployment)
    if not version:
        raise rollout.InvalidUpdate(f"the registry has no current {deployment!r} version")
    canary = reg.canary(deployment)
    if canary:
        return rollout.RolloutState(version, canary["version"], int(canary["percent"]))
    return rollout.RolloutState(version)


def make_handler(apply: Callable[[rollout.RolloutState], None], state: rollout.RolloutState,
                 version_exists: Callable[[str], bool],
                 deployment: str = DEPLOYMENT) -> kafka_loop.Handler[events_pb2.ModelUpdate]:
    """The `model.updates` handler: validate, compute the new state, apply it (idempotent)."""
    current = state

    def handle(ev: kafka_loop.Consumed[events_pb2.ModelUpdate]) -> Iterable[events.OutEvent]:
        nonlocal current
        upd = ev.message
        if upd.deployment and upd.deployment != deployment:
            return []  # another deployment's rollout
        try:
            new = rollout.apply(current, upd.action, upd.version, upd.canary_percent)
        except rollout.InvalidUpdate as exc:
            raise events.PoisonEvent(f"invalid model update: {exc}") from None
        serving = {current.version, current.canary_version}
        for v in filter(None, (new.version, new.canary_version)):
            if v not in serving and not version_exists(v):  # only what is to be loaded
                raise events.PoisonEvent(f"invalid model update: version {v!r} is not in the registry")
        if new != current:
            log.info("applying a model update", extra={"from": current.user_config(), "to": new.user_config(),
                                                        "action": upd.action})
            apply(new)
            current = new
        return []

    return handle


def _publish(kafka: KafkaConfig, update: events_pb2.ModelUpdate) -> None:
    topics.ensure_topics(kafka.bootstrap_servers, [topics.MODEL_UPDATES], kafka=kafka)
    producer = kafka_loop.make_producer(kafka, "colloquy-rollout")
    try:
        out = events.OutEvent(topics.MODEL_UPDATES.name, update.deployment, update)
        producer.send(out.topic, key=out.key.encode(), value=update.SerializeToString(),
                      headers=out.headers()).get(timeout=15)
    finally:
        producer.close(timeout=10)


def main(argv: list[str] | None = None) -> int:
    from model.registry import Registry, RegistryError

    parser = argparse.ArgumentParser(prog="python -m services.generation.updates", description=__doc__.split("\n")[0])
    parser.add_argument("--deployment", default=DEPLOYMENT)
    parser.add_argument("--registry", default=None, help="registry root (default $COLLOQUY_MODEL_REGISTRY)")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("promote", help="serve VERSION (fully, or to --canary percent of conversations)")
    p.add_argument("version")
    p.add_argument("--canary", type=int, default=100, metavar="PERCENT", help="1..99 for a canary; 100: all")
    sub.add_parser("rollback", help="serve the version served before (or the current one's parent)")
    sub.add_parser("status", help="print what the registry says is served")
    args = parser.parse_args(argv)
    reg = Registry(args.registry)
    dep = args.deployment
    try:
        before = registry_state(reg, dep)
        if args.cmd == "status":
            print(json.dumps(before.user_config(), indent=2))
            return 0
        if args.cmd == "promote":
            if not 1 <= args.canary <= 100:
                parser.error("--canary must be in 1..100")
            after = rollout.apply(before, "promote", args.version, args.canary)
            if after.canary_version:
                reg.set_canary(dep, after.canary_version, after.canary_percent)
            else:
                reg.set_current(dep, after.version, reason="rollout promote")
                reg.clear_canary(dep)
            update = events_pb2.ModelUpdate(deployment=dep, version=args.version, action="promote",
                                            parent_version=before.version, canary_percent=args.canary)
        else:
            if before.canary_version:  # rolling back a canary: drop it, the stable version stays
                reg.clear_canary(dep)
                target = before.version
            else:
                target = reg.rollback(dep, reason="rollout rollback")["version"]
            after = rollout.RolloutState(target)
            update = events_pb2.ModelUpdate(deployment=dep, version=target, action="rollback",
                                            parent_version=before.version)
    except (RegistryError, rollout.InvalidUpdate) as exc:
        print(f"rollout refused: {exc}", file=sys.stderr)
        return 2
    kafka = load_or_exit(KafkaConfig)
    _publish(kafka, update)
    print(json.dumps({"before": before.user_config(), "after": after.user_config()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
