"""Keyword-only where values look alike: no public function of ladd_ds takes two parameters that
the same value could fill by position, so that `steps` and `seed` swapped is a TypeError, not a
silently wrong run.

The rule, for every public function and method (a name without a leading "_", plus `__init__` of a
public class) at the top level of a ladd_ds module: among its positional-or-keyword parameters
after the first one (after `self` / `cls` and the first one for a method), no two may be annotated
with overlapping scalar types. A scalar annotation is int, float, str, bool or Path, alone or in a
union (`X | None`, `Optional[X]` and `str | Path` included); two annotations overlap when one type
is in both (`str | Path` and `str | None` do, `int` and `float` do not). The first parameter is
exempt: it is what the function acts on (`sm`, `cfg`, a path), and `f(x, *, a, b)` reads as it
should. Unannotated parameters and non-scalar ones (tensors, lists, configs) are not checked.

The modules are parsed, not imported: importing every module (diffusers, deepspeed) took 8.7 s
on this 2-core machine, parsing them well under one."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ladd_ds"
SCALARS = {"int", "float", "str", "bool", "Path"}

# Parameter pairs whose order is the order of a tensor's dimensions everywhere (torch, PIL sizes
# aside): swapping them is as visible as swapping the axes of a shape.
NATURAL_PAIRS = {("height", "width"), ("h", "w")}

# Functions whose positional order is the one of the library call they wrap.
ALLOWED = {
    "core/flow.py:sample_logit_normal": "(mean, std) in torch.normal's order, a math helper",
    "sampling.py:initial_noise": "(channels, h, w): the noise's shape, in torch.randn's order",
}


def scalar_types(annotation: ast.expr | None) -> frozenset[str]:
    """The scalar types an annotation admits ({} when it is not a scalar annotation)."""
    if annotation is None:
        return frozenset()
    text = ast.unparse(annotation).replace(" ", "").strip("'\"")  # string annotations as written
    if text.startswith("Optional[") and text.endswith("]"):
        text = text[len("Optional[") : -1]
    types = {t for t in text.split("|") if t != "None"}
    return frozenset(types) if types and types <= SCALARS else frozenset()


def public_functions(tree: ast.Module):
    """(name, function node, is_method) for the module's public functions and public classes' methods."""
    funcs = (ast.FunctionDef, ast.AsyncFunctionDef)
    for node in tree.body:
        if isinstance(node, funcs) and not node.name.startswith("_"):
            yield node.name, node, False
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            for f in node.body:
                if isinstance(f, funcs) and (not f.name.startswith("_") or f.name == "__init__"):
                    static = any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in f.decorator_list)
                    yield f"{node.name}.{f.name}", f, not static


def look_alike(func: ast.FunctionDef | ast.AsyncFunctionDef, is_method: bool) -> list[tuple[str, str]]:
    """Pairs of positional parameters (after the first) that one scalar value could fill."""
    params = func.args.posonlyargs + func.args.args
    params = params[2:] if is_method else params[1:]
    typed = [(p.arg, scalar_types(p.annotation)) for p in params]
    return [(a, b) for i, (a, ta) in enumerate(typed) for b, tb in typed[i + 1 :] if ta & tb and (a, b) not in NATURAL_PAIRS]


def violations(package: Path = PACKAGE) -> dict[str, list[tuple[str, str]]]:
    found = {}
    for path in sorted(package.rglob("*.py")):
        relative = path.relative_to(package).as_posix()
        for name, func, is_method in public_functions(ast.parse(path.read_text(), filename=str(path))):
            pairs = look_alike(func, is_method)
            if pairs:
                found[f"{relative}:{name}"] = pairs
    return found


def test_look_alike_parameters_are_keyword_only():
    found = {k: v for k, v in violations().items() if k not in ALLOWED}
    assert not found, "put these parameters after `*` (or justify an entry in ALLOWED):\n" + "\n".join(
        f"  {k}: {v}" for k, v in found.items()
    )


def test_allowlist_is_current():
    """Every ALLOWED entry still names a function the rule flags: a stale entry would hide the next one."""
    stale = set(ALLOWED) - set(violations())
    assert not stale, f"remove from ALLOWED: {sorted(stale)}"


def test_the_rule_catches_a_swappable_signature(tmp_path):
    """The rule on made-up code: what it must flag and what it must let through."""
    (tmp_path / "m.py").write_text(
        "from pathlib import Path\n"
        "def bad(sm, steps: int, cfg: float, seed: int | None = None): ...\n"
        "def paths(cfg, out: str | Path, prompts: str): ...\n"
        "def good(sm, steps: int, *, seed: int): ...\n"
        "def mask(height: int, width: int, seed: int = 0, *, kinds=None): ...\n"
        "def sized(x, height: int, width: int): ...\n"
        "def _private(a, b: int, c: int): ...\n"
        "class C:\n"
        "    def __init__(self, cfg, rank: int, world: int): ...\n"
        "    @staticmethod\n"
        "    def make(cfg, a: bool, b: bool): ...\n"
    )
    assert violations(tmp_path) == {
        "m.py:bad": [("steps", "seed")],
        "m.py:paths": [("out", "prompts")],
        "m.py:mask": [("width", "seed")],
        "m.py:C.__init__": [("rank", "world")],
        "m.py:C.make": [("a", "b")],
    }
