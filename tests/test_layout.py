"""The house rules of the package layout (docs/architecture.md), checked on the source itself:
no two modules import each other (directly or round a cycle), the core imports no capability
package, and no capability imports an adapter."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

from bot.config import REPO_ROOT

PACKAGE = REPO_ROOT / "bot"
CAPABILITIES = ("bot.safety", "bot.memory", "bot.spend", "bot.images", "bot.ops")


def _module(path: Path) -> str:
    name = ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts)
    return name.removesuffix(".__init__")


def imports() -> dict[str, set[str]]:
    """Each module's imports of our own modules, TYPE_CHECKING blocks left out."""
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    found: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        typing_only = {
            id(inner)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for inner in ast.walk(node)
        }
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("bot"):
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    found[name].add(full if full in modules else node.module)
            elif isinstance(node, ast.Import):
                found[name].update(a.name for a in node.names if a.name.startswith("bot"))
    return found


def _cycle_from(start: str, graph: dict[str, set[str]]) -> list[str] | None:
    stack, seen = [(start, [start])], set()
    while stack:
        node, path = stack.pop()
        for nxt in graph.get(node, ()):
            if nxt == start:
                return [*path, start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, [*path, nxt]))
    return None


def test_no_import_cycles() -> None:
    graph = imports()
    cycles = [c for m in sorted(graph) if (c := _cycle_from(m, graph)) is not None]
    assert cycles == []


def test_the_core_imports_no_capability() -> None:
    wrong = {
        (module, target)
        for module, targets in imports().items()
        if module.startswith("bot.core")
        for target in targets
        if target.startswith(CAPABILITIES) or target.startswith("bot.adapters")
    }
    assert wrong == set()


def test_capabilities_import_no_adapter_and_not_the_app() -> None:
    wrong = {
        (module, target)
        for module, targets in imports().items()
        if module.startswith(("bot.core", "bot.brains", *CAPABILITIES[:-1]))
        for target in targets
        if target.startswith("bot.adapters") or target in ("bot.app", "bot.runner", "bot.cli")
    }
    assert wrong == set()
