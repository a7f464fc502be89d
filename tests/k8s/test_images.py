"""docker/Dockerfile, checked statically (no container engine here): pinned bases, non-root users,
serving images without torch, protos generated at build time, every image the overlays use built.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib

import pytest
import yaml

from devtools.k8s import manifests

DOCKERFILE = manifests.ROOT / "docker" / "Dockerfile"
DOCKERIGNORE = manifests.ROOT / "docker" / "Dockerfile.dockerignore"
# Image repository (as the overlays name it) -> Dockerfile target that builds it.
TARGETS = {
    "ghcr.io/colloquy/colloquy-serving": "serving",
    "ghcr.io/colloquy/colloquy-generation-cuda": "generation-cuda",
    "ghcr.io/colloquy/colloquy-training": "training",
}
SERVING_TARGETS = ("serving", "generation-cuda")


@dataclasses.dataclass
class Stage:
    name: str
    base: str  # an image reference or another stage's name
    lines: list[str]

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def copies_from(self) -> list[tuple[str, str]]:
        """(stage, source paths) of every COPY --from=."""
        return [(m.group(1), m.group(2)) for m in re.finditer(r"COPY --from=(\S+) (.+?) \S+$", self.text, re.M)]


def parse() -> tuple[dict[str, str], dict[str, Stage]]:
    """Global ARG defaults and the stages, with line continuations joined."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text(encoding="utf-8"))
    args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if current is None and line.startswith("ARG ") and "=" in line:
            key, value = line[4:].split("=", 1)
            args[key.strip()] = value.strip()
        elif line.startswith("FROM "):
            m = re.match(r"FROM (?:--platform=\S+ )?(\S+)(?: AS (\S+))?$", line, re.I)
            assert m and m.group(2), f"every stage is named: {line}"
            base = re.sub(r"\$\{(\w+)\}", lambda a: args[a.group(1)], m.group(1))
            current = stages[m.group(2)] = Stage(m.group(2), base, [])
        elif current is not None:
            current.lines.append(line)
    return args, stages


def ancestry(stages: dict[str, Stage], name: str) -> list[str]:
    """A stage and the stages it is built FROM, nearest first."""
    chain = [name]
    while stages[chain[-1]].base in stages:
        chain.append(stages[chain[-1]].base)
    return chain


def test_targets_exist_and_are_multi_stage() -> None:
    _, stages = parse()
    assert set(TARGETS.values()) <= set(stages)
    for target in TARGETS.values():
        # Built in several stages: the final image gets artifacts, not build tools.
        assert any(src for src, _ in stages[target].copies_from()), target


def test_base_images_are_pinned() -> None:
    _, stages = parse()
    external = {s.base for s in stages.values() if s.base not in stages and s.base != "scratch"}
    assert external, "no base images found"
    for image in external:
        tag = image.split("@")[0].rpartition(":")[2] if ":" in image.split("/")[-1] else ""
        assert "@sha256:" in image or (re.search(r"\d+\.\d+\.\d+", tag) and tag != "latest"), \
            f"{image}: pin an exact version tag (or a digest)"


def test_python_matches_the_project() -> None:
    args, _ = parse()
    requires = tomllib.loads((manifests.ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert requires.startswith(">=3.11") and "<3.12" in requires
    assert re.match(r"python:3\.11\.\d+-slim-", args["PYTHON_IMAGE"])
    assert args["PYTHON_VERSION"].startswith("3.11.")
    setup = (manifests.ROOT / "scripts" / "setup.sh").read_text(encoding="utf-8")
    assert f'uv=={args["UV_VERSION"]}' in setup, "the images use the uv version setup.sh pins"


@pytest.mark.parametrize("target", list(TARGETS.values()))
def test_images_run_as_non_root(target: str) -> None:
    _, stages = parse()
    users = re.findall(r"^USER (\S+)$", stages[target].text, re.M)
    assert users, f"{target}: no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"{target}: USER must be a numeric non-root UID (runAsNonRoot)"


@pytest.mark.parametrize("target", SERVING_TARGETS)
def test_serving_images_have_no_torch(target: str) -> None:
    _, stages = parse()
    chain = ancestry(stages, target)
    assert not [s for s in chain if "train.lock" in stages[s].text], chain
    for src, paths in stages[target].copies_from():
        if "train.lock" in stages[src].text or "train-venv" in ancestry(stages, src):
            # Only built artifacts may cross over (moderation's ONNX export), never the venv.
            assert "/opt/venv" not in paths and paths.startswith("/opt/colloquy/"), (target, src, paths)
    assert not re.search(r"^torch==", (manifests.ROOT / "requirements" / "serve.lock").read_text(), re.M)


def test_dependency_locks_are_installed_exactly() -> None:
    _, stages = parse()
    assert "uv pip sync /tmp/serve.lock" in stages["serve-venv"].text
    assert "uv pip sync /tmp/serve.lock" in stages["cuda-venv"].text
    assert "uv pip sync /tmp/train.lock" in stages["train-venv"].text
    assert "serve-venv" in {s for s, _ in stages["serving"].copies_from()}
    assert "train-venv" in {s for s, _ in stages["training"].copies_from()}


def test_protos_are_generated_at_build_time() -> None:
    _, stages = parse()
    assert "grpc_tools.protoc" in stages["protos"].text
    assert ("protos", "/out") in stages["app"].copies_from()
    for target in TARGETS.values():
        assert "app" in {s for s, _ in stages[target].copies_from()}, target
        assert "PYTHONPATH=/app:/app/build/python" in stages[target].text, target


def test_context_excludes_the_venv_and_state() -> None:
    lines = [x.strip() for x in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
             if x.strip() and not x.startswith("#")]
    assert lines[0] == "**", "allowlist: ignore everything, then re-include what the images copy"
    assert not [x for x in lines if x.startswith("!") and x.strip("!/") in {".venv", "var", "build"}]


def test_overlay_images_are_built_here_and_tagged_with_the_version() -> None:
    version = tomllib.loads((manifests.ROOT / "pyproject.toml").read_text())["project"]["version"]
    for overlay in manifests.OVERLAYS:
        kust = yaml.safe_load((manifests.K8S / "overlays" / overlay / "kustomization.yaml").read_text())
        for image in kust["images"]:
            assert image.get("newName", image["name"]) in TARGETS, image
            assert image["newTag"] == version, f"{overlay}: {image['name']} tag {image['newTag']} != {version}"
        # The RLHF RayJob template is data kustomize does not rewrite: same version by hand.
        rayjob = (manifests.K8S / "overlays" / overlay / "rlhf" / "rayjob.yaml").read_text()
        assert set(re.findall(r"image: (\S+)", rayjob)) == {f"ghcr.io/colloquy/colloquy-training:{version}"}


def _locked(lock: str, package: str) -> str:
    text = (manifests.ROOT / "requirements" / lock).read_text(encoding="utf-8")
    found = re.search(rf"^{re.escape(package)}==(\S+)", text, re.M)
    assert found, f"{package} not in {lock}"
    return found.group(1)


def test_ray_clusters_declare_the_locked_ray_version(render) -> None:  # type: ignore[no-untyped-def]
    """KubeRay picks Ray features by rayVersion: it must be the Ray the images install."""
    for overlay in manifests.OVERLAYS:
        docs = render(overlay)
        (rs,) = manifests.by_kind(docs, "RayService").values()
        assert rs["spec"]["rayClusterConfig"]["rayVersion"] == _locked("serve.lock", "ray")
        for job in manifests.embedded_objects(docs):
            assert job["spec"]["rayClusterSpec"]["rayVersion"] == _locked("train.lock", "ray")


def test_the_training_image_carries_the_cpu_models_kernel_built_from_the_locked_crate() -> None:
    """Without it the model-bootstrap Job skips cpu-int4-gguf-lut (no cargo in the image) and serves
    the slower f32act build; the library must land where model.lut_kernel looks for it."""
    from model import lut_kernel

    _, stages = parse()
    builder = next(s for s in stages.values() if "cargo build --release --locked" in s.text)
    assert "Cargo.lock" in builder.text and stages[builder.name].base.startswith("rust:")
    want = lut_kernel.LIBRARY.relative_to(manifests.ROOT)
    copied = [(src, paths) for src, paths in stages["training"].copies_from() if src == builder.name]
    assert copied and copied[0][1].endswith(want.name), copied
    assert f"/app/{want.parent}/" in stages["training"].text
    for target in SERVING_TARGETS:  # they load the copy in the model directory, not this one
        assert builder.name not in {s for s, _ in stages[target].copies_from()}
    ignored = DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
    assert str(lut_kernel.CRATE.relative_to(manifests.ROOT) / "target") in ignored  # no local build in the context
