"""A second opinion on the flows: cyclonus, an offline NetworkPolicy engine, judges them too.

connectivity.py evaluates NetworkPolicy semantics itself; a mistake there would pass its own
tests. Here the same render's policies (plus the one Strimzi writes) go to cyclonus
(github.com/mattfenwick/cyclonus, pinned below; `bash scripts/k8s-netpol-check.sh` installs it
into .venv/bin and runs this), with a query for every flow a container is configured to dial and,
as controls, every other pod of the render toward the same targets. cyclonus must allow each
dialed flow and agree with connectivity.py on every query (the controls include denied ones, so a
tool that read no policy and allowed everything fails).

`python -m devtools.k8s.netpol_tool` prints the disagreements and exits 1 on any; 2 without cyclonus.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from devtools.k8s import connectivity, manifests
from devtools.k8s.manifests import Obj

CYCLONUS_MODULE = "github.com/mattfenwick/cyclonus/cmd/cyclonus"
CYCLONUS_VERSION = "v0.5.6"
HINT = (f"cyclonus not found: `bash scripts/k8s-netpol-check.sh` installs it into .venv/bin (go install "
        f"{CYCLONUS_MODULE}@{CYCLONUS_VERSION}), or set CYCLONUS=/path/to/cyclonus")
ALLOWED = re.compile(r"IS ALLOWED\?\s*\|\s*(TRUE|FALSE)")


def find_cyclonus() -> str | None:
    """$CYCLONUS, else the venv's (where the script installs it), else one on PATH or in ~/go/bin."""
    if os.environ.get("CYCLONUS"):
        return os.environ["CYCLONUS"]
    for path in (Path(sys.prefix) / "bin" / "cyclonus", Path.home() / "go" / "bin" / "cyclonus"):
        if path.is_file():
            return str(path)
    return shutil.which("cyclonus")


@dataclasses.dataclass(frozen=True)
class Query:
    """One flow to judge, and what connectivity.py says of it."""

    what: str
    source: dict[str, str]
    destination: dict[str, str]
    port: int
    port_name: str | None
    dialed: bool  # a container is configured to make it
    expected: bool  # connectivity.py's verdict

    def traffic(self, index: int) -> dict[str, Any]:
        """cyclonus' matcher.Traffic: both pods inside the namespace, made-up documentation IPs."""
        def peer(labels: dict[str, str], ip: str) -> dict[str, Any]:
            return {"IP": ip, "Internal": {"PodLabels": labels, "Namespace": manifests.NAMESPACE,
                                           "NamespaceLabels": connectivity.NAMESPACE_LABELS}}
        out: dict[str, Any] = {"Source": peer(self.source, f"192.0.2.{index % 250 + 1}"),
                               "Destination": peer(self.destination, f"198.51.100.{index % 250 + 1}"),
                               "Protocol": "TCP", "ResolvedPort": self.port}
        if self.port_name:
            out["ResolvedPortName"] = self.port_name
        return out


def queries(objects: list[Obj]) -> list[Query]:
    """Every dialed flow, and every other pod template toward the same target port (controls)."""
    pols = connectivity.policies(objects)
    pts = manifests.all_pod_templates(objects)
    out: list[Query] = []
    seen: set[tuple[str, str, int]] = set()
    dialed: set[tuple[str, str, int]] = set()
    targets = []
    for dial in connectivity.dials(objects):
        target = connectivity.resolve(objects, dial)
        dialed.add((dial.source.owner, target.what, target.port))
        targets.append(target)
    for target in targets:
        for pt in pts:
            key = (pt.owner, target.what, target.port)
            if key in seen:
                continue
            seen.add(key)
            for dst in target.labels():
                ok = connectivity.admits(pols, pt.labels, "Egress", dst, target.port, target.port_name) and \
                    connectivity.admits(pols, dst, "Ingress", pt.labels, target.port, target.port_name)
                out.append(Query(f"{pt.owner} -> {target.what} port {target.port}", pt.labels, dst,
                                 target.port, target.port_name, key in dialed, ok))
    return out


def judge(cyclonus: str, objects: list[Obj], queries_: list[Query]) -> list[bool]:
    """cyclonus' verdict on each query, in order."""
    items = [{"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", **{k: v for k, v in p.items()
                                                                              if k not in ("apiVersion", "kind")}}
             for p in connectivity.policies(objects)]
    for p in items:
        p["metadata"].setdefault("namespace", manifests.NAMESPACE)
    with tempfile.TemporaryDirectory(prefix="cyclonus-") as tmp:
        policy_path, traffic_path = Path(tmp) / "policies.json", Path(tmp) / "traffic.json"
        policy_path.write_text(json.dumps({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicyList",
                                           "items": items}), encoding="utf-8")
        traffic_path.write_text(json.dumps([q.traffic(i) for i, q in enumerate(queries_)]), encoding="utf-8")
        proc = subprocess.run([cyclonus, "analyze", "--mode", "query-traffic", "--policy-path", str(policy_path),
                               "--traffic-path", str(traffic_path), "-v", "error"],
                              capture_output=True, text=True, timeout=300, check=False)
    verdicts = [m == "TRUE" for m in ALLOWED.findall(proc.stdout)]
    if proc.returncode != 0 or len(verdicts) != len(queries_):
        raise AssertionError(f"cyclonus exited {proc.returncode} with {len(verdicts)} verdicts for "
                             f"{len(queries_)} queries:\n{proc.stderr[-4000:]}")
    return verdicts


def disagreements(cyclonus: str, objects: list[Obj]) -> tuple[list[str], list[Query]]:
    """(problems, queries): dialed flows cyclonus denies, and any verdict unlike connectivity.py's."""
    qs = queries(objects)
    problems = []
    for q, allowed in zip(qs, judge(cyclonus, objects, qs), strict=True):
        if q.dialed and not allowed:
            problems.append(f"dialed but denied by cyclonus: {q.what}")
        elif allowed != q.expected:
            problems.append(f"cyclonus says {'allowed' if allowed else 'denied'}, connectivity.py "
                            f"{'allowed' if q.expected else 'denied'}: {q.what}")
    return problems, qs


def main() -> int:
    cyclonus, kubectl = find_cyclonus(), manifests.find_kubectl()
    if cyclonus is None or kubectl is None:
        print(HINT if cyclonus is None else manifests.KUBECTL_HINT, file=sys.stderr)
        return 2
    failed = False
    for overlay in manifests.OVERLAYS:
        docs = manifests.render(overlay, kubectl)
        problems, qs = disagreements(cyclonus, docs + manifests.embedded_objects(docs))
        dialed = sum(q.dialed for q in qs)
        denied = sum(not q.expected for q in qs)
        print(f"{overlay}: {len(qs)} flows judged by cyclonus ({dialed} dialed, {denied} denied controls): "
              + ("agree" if not problems else f"{len(problems)} problems"))
        for line in problems:
            print(f"  {line}")
        failed |= bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
