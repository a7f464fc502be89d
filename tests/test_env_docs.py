"""Every environment variable the code reads is in docs/configuration.md, with its real default.

The code is read, not run: `env("NAME", default)` fields (services/common/config.py's mechanism),
each service's `DEFAULTS` (its own fallbacks for shared fields) and direct `os.environ` /
`os.getenv` reads, in every module under services/, model/ and rlhf/. A gap names the variable,
the file and line, and the default the documentation should show.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CODE_DIRS = ("services", "model", "rlhf")
DOC = ROOT / "docs" / "configuration.md"
# Process plumbing the code passes through, not Colloquy settings.
NOT_CONFIG = {"PYTHONPATH"}
# A default computed at run time (no literal) is documented as any text; only its presence is checked.
COMPUTED = object()


@dataclass(frozen=True)
class Read:
    var: str
    default: object  # a literal, None (no default: required or unset), or COMPUTED
    where: str


def _constants() -> dict[str, object]:
    """Module-level `NAME = <literal>` across the code, for names passed instead of literals
    (`env(SLOT_TOKENS_ENV, SLOT_TOKENS_DEFAULT)`); a name bound to two values is left out."""
    seen: dict[str, set[object]] = {}
    for d in CODE_DIRS:
        for path in (ROOT / d).rglob("*.py"):
            for node in ast.parse(path.read_text(encoding="utf-8")).body:
                if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                    try:
                        value = ast.literal_eval(node.value)
                    except ValueError:
                        continue
                    if isinstance(value, str | int | float | bool):
                        seen.setdefault(node.targets[0].id, set()).add(value)
    return {k: next(iter(v)) for k, v in seen.items() if len(v) == 1}


CONSTANTS = _constants()


def _literal(node: ast.expr | None) -> object:
    """The value of a literal, constant arithmetic (`4 * 1024`) or a known module constant."""
    if node is None:
        return None
    if isinstance(node, ast.Name | ast.Attribute):
        name = node.id if isinstance(node, ast.Name) else node.attr
        return CONSTANTS.get(name, COMPUTED)
    try:
        return ast.literal_eval(node)
    except ValueError:
        pass
    if all(isinstance(n, ast.Constant | ast.BinOp | ast.UnaryOp | ast.operator | ast.unaryop) for n in ast.walk(node)):
        return eval(compile(ast.Expression(node), "<default>", "eval"), {"__builtins__": {}})
    return COMPUTED


def _is_environ(node: ast.expr) -> bool:
    """`os.environ` or a name `environ` (a function's environment mapping)."""
    return (isinstance(node, ast.Attribute) and node.attr == "environ") or (
        isinstance(node, ast.Name) and node.id == "environ")


def reads_in(path: Path) -> list[Read]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    rel = path.relative_to(ROOT)
    out: list[Read] = []

    def add(var: object, default: object, node: ast.AST) -> None:
        if isinstance(var, str) and var not in NOT_CONFIG:
            out.append(Read(var, default, f"{rel}:{node.lineno}"))

    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            fn = node.func
            first = _literal(node.args[0]) if node.args else None
            second = node.args[1] if len(node.args) > 1 else None
            if isinstance(fn, ast.Name) and fn.id == "env" and node.args:
                if not isinstance(first, str):  # a name the scan cannot resolve must not slip through
                    first = f"<unresolved name at {rel}:{node.lineno}>"
                add(first, _literal(second) if second is not None else None, node)  # config.env(...)
            elif isinstance(fn, ast.Attribute) and fn.attr == "get" and _is_environ(fn.value):
                add(first, _literal(second), node)  # os.environ.get(...)
            elif isinstance(fn, ast.Attribute) and fn.attr == "getenv":
                add(first, _literal(second), node)  # os.getenv(...)
        elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load) and _is_environ(node.value):
            add(_literal(node.slice), None, node)  # os.environ["X"]
        elif isinstance(node, ast.Compare) and any(isinstance(op, ast.In) for op in node.ops) \
                and _is_environ(node.comparators[0]):
            add(_literal(node.left), None, node)  # "X" in os.environ
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "DEFAULTS"
                                                  for t in node.targets):
            for k, v in zip(getattr(node.value, "keys", []), getattr(node.value, "values", []), strict=True):
                add(_literal(k), ("per-service", _literal(v)), node)  # a service's own fallback
    return out


def code_reads() -> list[Read]:
    return [r for d in CODE_DIRS for p in sorted((ROOT / d).rglob("*.py")) for r in reads_in(p)]


def documented() -> dict[str, list[str]]:
    """variable -> the defaults its rows in docs/configuration.md give (`A` / `B` rows split)."""
    docs: dict[str, list[str]] = {}
    for line in DOC.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`"):
            continue
        names = re.findall(r"`([A-Z][A-Z0-9_]*)`", cells[0])
        defaults = [cells[1]] * len(names)
        for sep in (" / ", ", "):  # `A` / `B` | 1 / 2   or   `A`, `B` | 1, 2
            parts = [d.strip() for d in cells[1].split(sep)]
            if len(names) > 1 and len(parts) == len(names):
                defaults = parts
                break
        for name, default in zip(names, defaults, strict=True):
            docs.setdefault(name, []).append(default)
    return docs


def _spellings(value: object) -> set[str]:
    """How a default may be written in the docs."""
    if value is None or value == "":
        return {"empty", "unset", "(required)", "required", "—", "-"}
    if isinstance(value, bool):
        return {str(value).lower(), "1" if value else "0", "on" if value else "off"}
    if isinstance(value, float) and value.is_integer():
        return {str(int(value)), str(value)}
    if isinstance(value, list | tuple):
        return {",".join(map(str, value)), ", ".join(map(str, value)), "empty" if not value else ""}
    return {str(value)}


def _matches(default: object, written: str) -> bool:
    text = written.replace("`", "").strip()
    if default is COMPUTED:
        return bool(text)
    if isinstance(default, tuple) and default and default[0] == "per-service":
        return "per service" in text or re.search(rf"\b{re.escape(str(default[1]))}\b", text) is not None
    head = text.split(" (")[0].strip()  # "var/x.db (`$COLLOQUY_VAR/x.db`)" -> "var/x.db"
    return text in _spellings(default) or head in _spellings(default)


def test_the_scan_finds_what_it_should() -> None:
    """The scanner itself: it must see all three kinds of read (a broken scan would pass everything)."""
    seen = {r.var for r in code_reads()}
    assert {"GRPC_PORT", "KAFKA_BOOTSTRAP_SERVERS", "TLS_DIR", "COLLOQUY_MODEL_REGISTRY", "WEB_PORT"} <= seen
    assert len(seen) > 100, len(seen)


def test_every_variable_the_code_reads_is_documented_with_its_default() -> None:
    docs = documented()
    reads = code_reads()
    # A shared field a service overrides in its DEFAULTS is documented "per service".
    per_service = {r.var for r in reads if isinstance(r.default, tuple)}
    problems = []
    for read in reads:
        if read.var in per_service and any("per service" in d for d in docs.get(read.var, [])):
            continue
        rows = docs.get(read.var)
        if not rows:
            problems.append(f"{read.var} ({read.where}) is not in docs/configuration.md")
        elif read.default is not None and not any(_matches(read.default, d) for d in rows):
            want = read.default[1] if isinstance(read.default, tuple) else read.default
            problems.append(f"{read.var} ({read.where}): the code's default is {want!r}, "
                            f"docs/configuration.md says {' or '.join(map(repr, rows))}")
    assert not problems, "\n".join(sorted(set(problems)))


def test_no_documented_variable_is_unknown_to_the_code() -> None:
    """A row for a variable nothing reads (renamed, removed) misleads as much as a missing one."""
    read = {r.var for r in code_reads()}
    extra = sorted(set(documented()) - read - ALSO_READ)
    assert not extra, f"docs/configuration.md documents variables no code reads: {extra}"


# Read outside services/, model/ and rlhf/ (scripts, the test harness), yet settings a person sets.
ALSO_READ = {
    "COLLOQUY_KEEP_KAFKA", "COLLOQUY_KEEP_POSTGRES", "COLLOQUY_VAR", "COLLOQUY_PYTEST_HARD_EXIT",
    "POSTGRES_PORT", "STACK_START_TIMEOUT", "COLLOQUY_SKIP_MODEL_BUILD", "WEB_SCREENSHOTS_DIR",
    "TOKENIZER_PORT", "MODERATION_PORT", "PROMPT_PORT", "GENERATION_PORT", "GATEWAY_PORT", "FEEDBACK_PORT",
    "CONVERSATION_PORT", "BENCH_RESULTS", "PUSHGATEWAY_URL", "REPLICAS",
}


if __name__ == "__main__":  # pragma: no cover - a listing for writing the docs
    for r in sorted(code_reads(), key=lambda r: r.var):
        print(r.var, repr(r.default), r.where)


@pytest.fixture(autouse=True)
def _doc_exists() -> None:
    assert DOC.is_file(), "docs/configuration.md is missing"
