"""Every program the manifests and images run (`python -m X`, Serve import paths) exists, and is
in the image that runs it.

A module named in a container's command/args, an exec probe, a RayJob entrypoint, a RayService's
serveConfigV2, a Dockerfile CMD/RUN or a comment under k8s/ must be a module of this repository
(a file, or a package with __main__.py for `-m`) or an installed distribution's. The images must
then carry it: the top-level package of every module a container runs is copied into the image
that container uses (docker/Dockerfile) and re-included in the build context (.dockerignore).
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from devtools.k8s import manifests
from devtools.k8s.manifests import Obj
from tests.k8s import test_images

ROOT = manifests.ROOT
# `python -m X` in shell text, and ["python", "-m", "X"] in exec-form (JSON) arrays.
RUN_MODULE = re.compile(r"\bpython3?\s+-m\s+([A-Za-z_][\w.]*)")
RUN_MODULE_JSON = re.compile(r'"python3?",\s*"-m",\s*"([A-Za-z_][\w.]*)"')


def module_problem(name: str, runnable: bool) -> str | None:
    """Why `name` is not an importable (with `runnable`: `-m`-runnable) module, or None."""
    parts = name.split(".")
    top = ROOT / parts[0]
    if not (top.is_dir() or top.with_suffix(".py").is_file()):
        # Not this repository's: an installed distribution's (grpc_tools, pytest, ...). Only the
        # top level is looked up, so nothing is imported.
        return None if importlib.util.find_spec(parts[0]) is not None else f"no module {parts[0]!r} here or installed"
    for i in range(1, len(parts)):
        if not (ROOT.joinpath(*parts[:i]) / "__init__.py").is_file():
            return f"{'/'.join(parts[:i])} is not a package (no __init__.py)"
    path = ROOT.joinpath(*parts)
    if path.with_suffix(".py").is_file():
        return None
    if path.is_dir() and (path / "__init__.py").is_file():
        if not runnable or (path / "__main__.py").is_file():
            return None
        return f"{'/'.join(parts)} is a package without __main__.py: `python -m` cannot run it"
    return f"no {'/'.join(parts)}.py or {'/'.join(parts)}/ in the repository"


def _strings(node: Any) -> Iterator[str]:
    """Every string in a rendered object; lists of strings also joined (commands, args)."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        if node and all(isinstance(x, str) for x in node):
            yield " ".join(node)
        for value in node:
            yield from _strings(value)


def _container_modules(container: dict[str, Any]) -> set[str]:
    text = " ".join(container.get("command", []) + container.get("args", []))
    return set(RUN_MODULE.findall(text))


def test_every_python_module_the_manifests_run_exists(objects: list[Obj]) -> None:
    found: dict[str, str] = {}
    for obj in objects:
        for text in _strings(obj):
            for name in RUN_MODULE.findall(text):
                found.setdefault(name, manifests.ident(obj))
    # The ones that matter most must be among them (the search would otherwise pass vacuously).
    assert {"rlhf.job", "services.gateway", "services.generation", "model.build"} <= set(found), sorted(found)
    bad = [f"{where}: python -m {name}: {problem}" for name, where in sorted(found.items())
           if (problem := module_problem(name, runnable=True))]
    assert not bad, "\n".join(bad)


def test_rlhf_rayjob_runs_the_rlhf_job(objects: list[Obj]) -> None:
    jobs = [o for o in objects if o["kind"] == "RayJob"]
    assert jobs
    for job in jobs:
        assert RUN_MODULE.findall(job["spec"]["entrypoint"]) == ["rlhf.job"], job["spec"]["entrypoint"]


def test_serve_import_paths_exist(docs: list[Obj]) -> None:
    (rs,) = manifests.by_kind(docs, "RayService").values()
    serve = yaml.safe_load(rs["spec"]["serveConfigV2"])
    names = [app["import_path"].split(":")[0] for app in serve["applications"]]
    # grpc_servicer_functions are "<module>.<function>".
    names += [fn.rpartition(".")[0] for fn in serve.get("grpc_options", {}).get("grpc_servicer_functions", [])]
    assert names
    bad = [f"{n}: {p}" for n in names if (p := module_problem(n, runnable=False))]
    assert not bad, "\n".join(bad)


def _doc_files() -> list[Path]:
    return sorted([*manifests.K8S.rglob("*.yaml"), *manifests.K8S.rglob("*.md"),
                   test_images.DOCKERFILE, *ROOT.glob("scripts/k8s-*.sh")])


@pytest.mark.parametrize("path", _doc_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_python_module_named_in_k8s_and_docker_files_exists(path: Path) -> None:
    """Comments and READMEs included: a stale `python -m` in a how-to is a broken instruction."""
    text = path.read_text(encoding="utf-8")
    names = set(RUN_MODULE.findall(text)) | set(RUN_MODULE_JSON.findall(text))
    bad = [f"python -m {n}: {p}" for n in sorted(names) if (p := module_problem(n, runnable=True))]
    assert not bad, f"{path.relative_to(ROOT)}:\n" + "\n".join(bad)


def _image_packages(target: str) -> set[str]:
    """Top-level directories of this repository that a Dockerfile target puts under /app."""
    _, stages = test_images.parse()
    copied: set[str] = set()
    for stage in test_images.ancestry(stages, target):
        copied |= set(re.findall(r"^COPY (?!--from)(\S+) /app/\1$", stages[stage].text, re.M))
        if any(src == "app" for src, _ in stages[stage].copies_from()):
            copied |= set(re.findall(r"^COPY (?!--from)(\S+) /app/\1$", stages["app"].text, re.M))
    return {c.strip("/") for c in copied}


def _context_packages() -> set[str]:
    lines = test_images.DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
    return {x.strip()[1:].strip("/") for x in lines if x.strip().startswith("!")}


def test_images_carry_the_modules_their_containers_run(objects: list[Obj]) -> None:
    context = _context_packages()
    bad = []
    for pt in manifests.all_pod_templates(objects):
        for c in pt.containers() + pt.init_containers():
            repo = c["image"].split("@")[0].rsplit(":", 1)[0]
            modules = set(_container_modules(c))
            if pt.owner.startswith("RayJob/") and pt.owner.endswith(":head"):
                modules |= {m for o in objects if o["kind"] == "RayJob"
                            for m in RUN_MODULE.findall(o["spec"]["entrypoint"])}
            if not modules or repo not in test_images.TARGETS:
                continue
            packages = _image_packages(test_images.TARGETS[repo])
            for module in modules:
                top = module.split(".")[0]
                if not (ROOT / top).is_dir():
                    continue  # an installed distribution's: the image's lock provides it
                if top not in packages:
                    bad.append(f"{pt.owner}/{c['name']}: {module} is not copied into {repo} "
                               f"(docker/Dockerfile target {test_images.TARGETS[repo]})")
                if top not in context:
                    bad.append(f"{pt.owner}/{c['name']}: {top}/ is not in the build context (.dockerignore)")
    assert not bad, "\n".join(bad)


def test_training_image_carries_the_rlhf_job_and_its_data() -> None:
    packages = _image_packages("training")
    assert {"rlhf", "model", "services"} <= packages, packages  # rlhf.job imports model.*, services.*
    assert (ROOT / "rlhf" / "prompts.yaml").is_file()  # read at run time from rlhf/ (PROMPTS_FILE)
    assert "rlhf" not in _image_packages("serving")  # torch code stays out of the serving images
    _, stages = test_images.parse()
    assert RUN_MODULE_JSON.findall(stages["training"].text) == ["rlhf.job"]
