"""The import graph follows the data's flow: the core imports no stage, a stage imports only the core and the stages
before it (so a shared file format lives in the core, not in the stage that writes it), and no two modules import
each other, directly or around a circle. Read from the source (every import statement, also inside functions)."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("core", "prep", "data", "models", "eval", "train", "report")  # pipeline/'s packages, lowest first
# The one validation of the resolved config checks every stage's input (a model that builds, a data dir's layout,
# the links), so it sits above the stages it checks.
ABOVE_THE_STAGES = {"pipeline.core.validate"}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The pipeline modules ``path`` imports (``from pipeline.x import y`` counts y when it is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("pipeline.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if (REPO / (sub.replace(".", "/") + ".py")).is_file() else node.module)
    return found


def graph() -> dict[str, set[str]]:
    return {module_name(path): imports_of(path) for path in sorted((REPO / "pipeline").rglob("*.py"))}


def layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 2 and parts[1] in LAYERS else None


def test_no_import_runs_against_the_flow_of_the_data():
    upward = [f"{module} -> {target}" for module, targets in graph().items() if module not in ABOVE_THE_STAGES
              for target in targets
              if layer(module) is not None and layer(target) is not None and layer(target) > layer(module)]
    assert upward == []


def test_no_two_modules_import_each_other_around_a_circle():
    edges = graph()
    circles, state = [], {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(edges.get(module, ())):
            if state.get(target) == "open":
                circles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert circles == []
