"""Every configuration variable a service reads is set in its pods, and set to a valid value.

The variables come from the services' own config dataclasses (`config.env(...)` fields carry the
variable name in `metadata["env"]`): services/common/config.py (ServerConfig, KafkaConfig) plus
every dataclass in services/<name>/config.py, and for the RLHF job (rlhf/ at the repository root)
every dataclass in JOB_MODULES. A service directory with a config.py that is not mapped below
fails the test, so a new service cannot go unchecked.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from pathlib import Path
from typing import Any

import pytest

from devtools.k8s import manifests
from devtools.k8s.manifests import EnvValue, Obj
from services.common import config as common_config

SERVICES_DIR = manifests.ROOT / "services"
GRPC_SERVICES = ("gateway", "tokenizer", "moderation", "prompt", "feedback", "conversation")

# Variables a service reads that the deployment deliberately leaves at the code's default.
ALLOWLIST: dict[tuple[str, str], str] = {
    ("generation", "GRPC_PORT"): "the bridge serves no gRPC itself; Serve's proxy port is in serveConfigV2",
    ("generation", "GENERATION_GRPC_PORT"): "local runs only: on Kubernetes the port is serveConfigV2's",
    ("generation", "GENERATION_RAY_NUM_CPUS"): "sizes a local Ray; the bridge joins the RayService's (RAY_ADDRESS)",
    ("generation", "GENERATION_RAY_OBJECT_STORE_MB"): "sizes a local Ray; the bridge joins the RayService's",
    ("conversation", "CONVERSATION_DB"): "the embedded SQLite file, unused while DATABASE_URL names PostgreSQL",
    ("conversation", "CONVERSATION_DB_BUSY_TIMEOUT_MS"): "SQLite's lock wait, unused with PostgreSQL",
    ("conversation", "CONVERSATION_FAULT_KILL_BEFORE_COMMIT"): "a test hook (SIGKILL before a commit): never deployed",
    ("gateway", "CONVERSATION_DB"): "the embedded SQLite file, unused while DATABASE_URL names PostgreSQL",
    ("gateway", "CONVERSATION_DB_BUSY_TIMEOUT_MS"): "SQLite's lock wait, unused with PostgreSQL",
    ("prompt", "CONVERSATION_DB"): "the embedded SQLite file, unused while DATABASE_URL names PostgreSQL",
    ("prompt", "CONVERSATION_DB_BUSY_TIMEOUT_MS"): "SQLite's lock wait, unused with PostgreSQL",
}
# Variables set in pods that no config dataclass reads, and who reads them.
READ_ELSEWHERE: dict[str, str] = {
    "COLLOQUY_MODEL_REGISTRY": "model/paths.py registry_root()",
    "COLLOQUY_CACHE": "model/paths.py and services/moderation/paths.py cache_root()",
    "MY_POD_IP": "builds RAY_ADDRESS in the same pod spec",
    "FEEDBACK_DATASET_DIR": "rlhf/data.py dataset_dir() (the feedback sink's FeedbackConfig)",
    "PGPASSWORD": "libpq (psycopg) when DATABASE_URL has no password: the `postgres` Secret's, unescaped",
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "Ray Serve's controller (services/generation/serving.py RAY_ENV)",
}
# Jobs outside services/: their name -> the modules whose env() dataclasses they load.
JOB_MODULES: dict[str, tuple[str, ...]] = {"rlhf": ("rlhf.config", "rlhf.preference")}
# Other config classes a job loads: rlhf/job.py reads the replay's conversation store as the
# conversation service's readers do (StoreConfig: DATABASE_URL) unless RLHF_REPLAY_STORE is set.
JOB_CLASSES: dict[str, tuple[tuple[str, str], ...]] = {"rlhf": (("services.conversation.config", "StoreConfig"),)}
# A job's hyperparameters stay at the code's (tuned) defaults unless an overlay overrides one; what
# the deployment must set is where the job runs, reads, writes and reports (k8s/base/rlhf/trigger.yaml).
JOB_REQUIRED: dict[str, frozenset[str]] = {
    "rlhf": frozenset({"RLHF_RAY_ADDRESS", "RLHF_RAY_NUM_CPUS", "RLHF_NUM_WORKERS", "RLHF_CPUS_PER_WORKER",
                       "RLHF_USE_GPU", "PUSHGATEWAY_URL", "FEEDBACK_DATASET_DIR", "COLLOQUY_CACHE"}),
}
# TLS + SCRAM settings for the Kafka clients: the manifests set them, the services must read
# them (KafkaConfig, passed to every KafkaProducer/KafkaConsumer/KafkaAdminClient).
KAFKA_SECURITY = ("KAFKA_SECURITY_PROTOCOL", "KAFKA_SASL_MECHANISM", "KAFKA_SASL_USERNAME",
                  "KAFKA_SASL_PASSWORD", "KAFKA_SSL_CAFILE")


def env_classes(module_name: str) -> list[type]:
    module = importlib.import_module(module_name)
    return [obj for obj in vars(module).values()
            if dataclasses.is_dataclass(obj) and isinstance(obj, type) and obj.__module__ == module.__name__
            and any("env" in f.metadata for f in dataclasses.fields(obj))]


def env_names(classes: list[type]) -> set[str]:
    return {f.metadata["env"] for cls in classes for f in dataclasses.fields(cls) if "env" in f.metadata}


def service_modules() -> list[str]:
    services = {p.parent.name for p in SERVICES_DIR.glob("*/config.py") if p.parent.name != "common"}
    jobs = {name for name in JOB_MODULES if (manifests.ROOT / name / "config.py").is_file()}
    return sorted(services | jobs)


def config_modules(service: str) -> tuple[str, ...]:
    return JOB_MODULES.get(service, (f"services.{service}.config",))


COMMON = [common_config.ServerConfig, common_config.KafkaConfig]


@dataclasses.dataclass(frozen=True)
class Target:
    """A container a service's configuration must reach, and which config classes it loads."""

    owner_prefix: str
    container: str
    # "common": ServerConfig + KafkaConfig; "module": the service's own config classes;
    # "engine": only generation's EngineSettings.
    classes: tuple[str, ...] = ("common", "module")


def targets(service: str) -> list[Target]:
    if service in GRPC_SERVICES:
        return [Target(f"StatefulSet/{service}", service)]
    if service == "generation":
        return [Target("RayService/generation:head", "kafka-bridge"),
                Target("RayService/generation:head", "ray-head", ("engine",)),
                Target("RayService/generation:", "ray-worker", ("engine",))]
    if service == "rlhf":
        # The entrypoint (python -m rlhf.job) runs on the RayJob's head; its Ray Train workers
        # get their settings from it (train_loop_config), not from the environment.
        return [Target("RayJob/rlhf-*:head", "ray-head", ("module",))]
    if service == "web":
        # python -m services.web loads WebConfig only (no ServerConfig, no Kafka: it is a gRPC
        # client of the gateway and moderation); colloquy-common reaches it all the same.
        return [Target("Deployment/web", "web", ("module",))]
    raise AssertionError(f"services/{service}/config.py is not mapped to any pod: add it to targets()")


def classes_for(service: str, target: Target) -> list[type]:
    out: list[type] = []
    if "common" in target.classes:
        out += COMMON
    if "module" in target.classes:
        for module in config_modules(service):
            out += env_classes(module)
        out += [getattr(importlib.import_module(module), name) for module, name in JOB_CLASSES.get(service, ())]
    if "engine" in target.classes:
        out.append(importlib.import_module(f"services.{service}.config").EngineSettings)
    return out


def _target_env(objects: list[Obj], target: Target,
                ) -> tuple[manifests.PodTemplate, dict[str, Any], dict[str, EnvValue]]:
    pts = manifests.all_pod_templates(objects)
    configmaps = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ConfigMap"}
    pt, container = manifests.find_container(pts, target.owner_prefix, target.container)
    return pt, container, manifests.effective_env(container, configmaps)


def resolve(env: dict[str, EnvValue], pod_name: str = "pod-0") -> dict[str, str]:
    """What the process would see: literals, $(VAR) expanded, refs replaced by stand-ins."""
    raw: dict[str, str] = {}
    for name, v in env.items():
        if v.value is not None:
            raw[name] = v.value
        elif v.field_ref == "metadata.name":
            raw[name] = pod_name
        elif v.field_ref is not None:
            raw[name] = "10.0.0.1"
        else:
            raw[name] = "from-a-secret"
    return manifests.expand_vars(raw)


@pytest.mark.parametrize("service", service_modules())
def test_service_config_is_mapped(service: str) -> None:
    assert targets(service)


@pytest.mark.parametrize("service", service_modules())
def test_every_config_key_is_set(objects: list[Obj], service: str) -> None:
    if service == "rlhf" and not any(o["kind"] == "RayJob" for o in objects):
        pytest.fail("rlhf/config.py exists but the overlay has no RLHF RayJob template")
    for target in targets(service):
        _, _, env = _target_env(objects, target)
        wanted = env_names(classes_for(service, target))
        if service in JOB_REQUIRED:
            stale = JOB_REQUIRED[service] - wanted - set(READ_ELSEWHERE)
            assert not stale, f"{service}: JOB_REQUIRED names {sorted(stale)}, which the job no longer reads"
            wanted = set(JOB_REQUIRED[service])
        missing = sorted(v for v in wanted - set(env) if (service, v) not in ALLOWLIST)
        assert not missing, f"{target.owner_prefix}/{target.container} does not set {missing}"


@pytest.mark.parametrize("service", service_modules())
def test_config_values_load(objects: list[Obj], service: str) -> None:
    """The services' own loaders accept the values (types, ranges) the manifests give them."""
    for target in targets(service):
        _, _, env = _target_env(objects, target)
        environ = resolve(env)
        for cls in classes_for(service, target):
            try:
                common_config.load(cls, environ=environ)
            except common_config.ConfigError as exc:
                pytest.fail(f"{target.owner_prefix}/{target.container}: {exc}")


@pytest.mark.parametrize("service", service_modules())
def test_no_unknown_variables(objects: list[Obj], service: str) -> None:
    """Catches typos: every variable a service container gets is read by something."""
    for target in targets(service):
        _, _, env = _target_env(objects, target)
        known = env_names(COMMON) | env_names(classes_for(service, target))
        unknown = sorted(set(env) - known - set(READ_ELSEWHERE) - set(KAFKA_SECURITY))
        # Ray nodes get the shared ConfigMap too; what they do not read there is harmless.
        if "engine" in target.classes:
            unknown = [v for v in unknown if v not in env_names(COMMON)]
        assert not unknown, f"{target.owner_prefix}/{target.container} sets {unknown}, which nothing reads"


@pytest.mark.parametrize("service", GRPC_SERVICES)
def test_ports_instance_and_kafka_are_set_right(docs: list[Obj], service: str) -> None:
    _, container, env = _target_env(docs, targets(service)[0])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    values = resolve(env)
    assert values["GRPC_PORT"] == str(ports["grpc"])
    assert values["METRICS_PORT"] == str(ports["metrics"])
    assert values["GRPC_HOST"] == "0.0.0.0"  # probes and peers reach the pod IP
    assert env["INSTANCE_ID"] == EnvValue(field_ref="metadata.name")
    assert values["KAFKA_BOOTSTRAP_SERVERS"] == f"{manifests.KAFKA_CLUSTER}-kafka-bootstrap:9093"
    assert values["KAFKA_CREATE_TOPICS"] == ("true" if service == "gateway" else "false")


def test_generation_bridge_settings(docs: list[Obj]) -> None:
    _, container, env = _target_env(docs, targets("generation")[0])
    values = resolve(env)
    assert values["METRICS_PORT"] == str(next(p["containerPort"] for p in container["ports"]
                                              if p["name"] == "bridge-metrics"))
    assert values["RAY_ADDRESS"] == "10.0.0.1:6379"  # this pod's GCS
    assert env["INSTANCE_ID"] == EnvValue(field_ref="metadata.name")
    mount = Path(values["GENERATION_SERVE_CONFIG"]).parent
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert str(mount) in mounts


def test_api_keys_file_comes_from_the_secret(docs: list[Obj]) -> None:
    pt, container, env = _target_env(docs, targets("gateway")[0])
    path = Path(resolve(env)["API_KEYS_FILE"])
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(path.parent))
    assert "subPath" not in mount  # a subPath mount would never see a rotated Secret
    volume = next(v for v in pt.spec["volumes"] if v["name"] == mount["name"])
    assert volume["secret"]["secretName"].startswith("gateway-api-keys")
    secrets = manifests.by_kind(docs, "Secret")
    if volume["secret"]["secretName"] in secrets:  # dev; prod's is created by the operator
        assert path.name in secrets[volume["secret"]["secretName"]]["data"]


def test_kafka_security_settings_are_read_by_the_services() -> None:
    """The manifests' TLS + SCRAM settings reach every Kafka client the services make."""
    assert set(KAFKA_SECURITY) <= env_names([common_config.KafkaConfig])
    cfg = common_config.load(common_config.KafkaConfig, environ={
        "KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "KAFKA_SASL_USERNAME": "colloquy-gateway", "KAFKA_SASL_PASSWORD": "secret",
        "KAFKA_SSL_CAFILE": "/etc/colloquy/kafka-ca/ca.crt"})
    assert cfg.client_kwargs() == {
        "bootstrap_servers": cfg.bootstrap_servers, "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512", "sasl_plain_username": "colloquy-gateway",
        "sasl_plain_password": "secret", "ssl_cafile": "/etc/colloquy/kafka-ca/ca.crt"}
    # Every producer, consumer and admin client is built from client_kwargs() (kafka_loop's
    # make_producer/make_consumer, topics.ensure_topics): no module builds one without it.
    clients = re.compile(r"\bKafka(Producer|Consumer|AdminClient)\(")
    makers = []
    for top in ("services", "model", "rlhf"):
        for path in sorted((manifests.ROOT / top).rglob("*.py")):
            source = path.read_text(encoding="utf-8")
            if clients.search(source):
                makers.append(path.relative_to(manifests.ROOT).as_posix())
                assert "client_kwargs()" in source, f"{path}: a Kafka client without KafkaConfig.client_kwargs()"
    assert makers, "no Kafka clients found: the search moved"


def test_prompt_fits_prompts_in_generations_slot_from_generations_own_configmap(objects: list[Obj]) -> None:
    """The prompt stage assembles within GENERATION_SLOT_TOKENS; reading it from generation's
    ConfigMap (not a copy) keeps a changed slot from making generation refuse long chats."""
    _pt, _container, env = _target_env(objects, Target("StatefulSet/prompt", "prompt"))
    engine_cm = next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "generation-engine")
    assert env["GENERATION_SLOT_TOKENS"].configmap == ("generation-engine", "GENERATION_SLOT_TOKENS")
    assert env["GENERATION_SLOT_TOKENS"].value == engine_cm["data"]["GENERATION_SLOT_TOKENS"]



def _image_file(value: str) -> Path:
    return manifests.ROOT / value.removeprefix("/app/")


def test_every_image_path_a_pod_is_given_exists_in_the_sources(objects: list[Obj]) -> None:
    """A setting that names a file under /app (the image copies services/, model/, rlhf/ there)
    must name one the image has."""
    missing = [f"ConfigMap/{cm['metadata']['name']} {key}={value}"
               for cm in objects if cm["kind"] == "ConfigMap"
               for key, value in (cm.get("data") or {}).items()
               if isinstance(value, str) and value.startswith("/app/") and not _image_file(value).exists()]
    assert not missing, "paths the image does not have:\n  " + "\n  ".join(missing)


def test_moderation_pods_load_the_classifier_and_policy_they_are_given(objects: list[Obj]) -> None:
    """MODERATION_CLASSIFIER once named classifier.json (the training report) instead of the
    .npz the loader reads: every moderation pod would have exited at startup."""
    from services.moderation.classifier import Heads
    from services.moderation.policy import load as load_policy

    _pt, _container, env = _target_env(objects, Target("StatefulSet/moderation", "moderation"))
    heads = Heads.load(_image_file(env["MODERATION_CLASSIFIER"].value or ""))
    assert heads.meta
    load_policy(_image_file(env["MODERATION_POLICY"].value or ""))


def test_ray_nodes_get_the_ray_settings_a_local_ray_gets(objects: list[Obj]) -> None:
    """serving.RAY_ENV is what `python -m services.generation` gives its local Ray; the RayService's
    nodes must run Serve the same way."""
    from services.generation import serving

    for target in targets("generation")[1:]:
        env = resolve(_target_env(objects, target)[2])
        assert {k: env.get(k) for k in serving.RAY_ENV} == serving.RAY_ENV, target
