"""The package layering (README, "Architecture"): every module imports only from its own package
or from a lower layer, and no two modules import each other, directly or through others."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Bottom to top. Packages in one layer do not import each other.
LAYERS = [
    ["ladd_ds.core", "ladd_ds.__init__"],
    ["ladd_ds.distributed"],
    ["ladd_ds.models"],
    ["ladd_ds.config"],
    ["ladd_ds.data"],
    ["ladd_ds.sampling"],
    ["ladd_ds.generate", "ladd_ds.quality"],
    ["ladd_ds.training"],
    ["ladd_ds.ladd", "ladd_ds.dpo"],
    ["ladd_ds.export", "ladd_ds.methods"],
    ["ladd_ds.demo"],
    ["ladd_ds.cli", "evaluation"],
    ["ladd_ds.__main__"],
]


def package_of(module: str) -> str:
    """The LAYERS entry a module belongs to (the longest matching prefix)."""
    if module == "ladd_ds":  # the package's __init__: a docstring and the version
        return "ladd_ds.__init__"
    found = [p for layer in LAYERS for p in layer if module == p or module.startswith(p + ".")]
    assert found, f"{module} belongs to no layer: add its package to LAYERS (and to the README)"
    return max(found, key=len)


def layer_of(package: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if package in layer)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    return (REPO / name.replace(".", "/")).with_suffix(".py").is_file()


def project_imports(path: Path) -> set[str]:
    """Every ladd_ds / evaluation module `path` imports, at module level or inside a function."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
            # `from ladd_ds.core import flow` imports the module ladd_ds.core.flow
            names += [f"{node.module}.{a.name}" for a in node.names if _is_module(f"{node.module}.{a.name}")]
            out.update(n for n in names if n.split(".")[0] in ("ladd_ds", "evaluation"))
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] in ("ladd_ds", "evaluation"))
    return out


def import_graph() -> dict[str, set[str]]:
    files = sorted((REPO / "ladd_ds").rglob("*.py")) + sorted((REPO / "evaluation").rglob("*.py"))
    return {module_name(p): project_imports(p) - {module_name(p)} for p in files}


def test_every_import_goes_down_the_layers():
    upward = []
    for module, imports in import_graph().items():
        mine = package_of(module)
        for target in imports:
            theirs = package_of(target)
            if theirs != mine and layer_of(theirs) >= layer_of(mine) and not mine.startswith(theirs + "."):
                upward.append(f"{module} imports {target} ({theirs} is not below {mine})")
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    graph = import_graph()
    modules = {m for m in graph}
    # A package's __init__ is imported with each of its modules; edges to it are real edges.
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph.get(m, ())):
            if n not in modules:
                continue
            if state.get(n) == 1:
                cycles.append(" -> ".join(path[path.index(n) :] + [n]) if n in path else f"{m} -> {n}")
            elif n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(modules):
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(cycles)


def test_the_checker_sees_an_upward_import(tmp_path):
    """The rules above are not vacuous: a module of a low layer importing a higher one fails."""
    fake = REPO / "ladd_ds" / "core" / "_layer_probe.py"
    fake.write_text("from ladd_ds.training.trainer import Trainer\n")
    try:
        graph = import_graph()
        assert "ladd_ds.training.trainer" in graph["ladd_ds.core._layer_probe"]
        assert layer_of(package_of("ladd_ds.training.trainer")) > layer_of(package_of("ladd_ds.core._layer_probe"))
    finally:
        fake.unlink()
