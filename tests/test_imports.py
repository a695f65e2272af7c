"""The house drawn from the code's imports: utils/ has no import cycles, and the product (utils/ outside utils/toy,
the training scripts) imports nothing from the toy world, which plugs into the registries as a user's plugin would.

Every import counts, also those inside functions (a deferred import still ties the two modules together)."""
import ast
from pathlib import Path

from conftest import REPO_ROOT

SCRIPTS = ["train_draftp.py", "train_dpo.py", "evaluate.py"]


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, known: set) -> set:
    """The project modules `path` imports (`from x import y` counts as x.y where x.y is a module, else x)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in known and t != name)
    return found


def import_graph():
    files = sorted((REPO_ROOT / "utils").rglob("*.py"))
    known = {module_name(f) for f in files}
    return {module_name(f): imported_modules(f, known) for f in files}, known


def find_cycle(graph):
    """One import cycle as a list of modules, or None."""
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt, stack + [nxt])
                if cycle:
                    return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start, [start])
            if cycle:
                return cycle
    return None


def test_the_graph_sees_imports_inside_functions_and_relative_ones():
    """The checks below are only as good as the graph: it must hold edges that are easy to miss."""
    graph, _ = import_graph()
    assert "utils.models" in graph["utils.sampling"]  # `from .models import TextConditioning`
    assert "utils.train.checkpoints" in graph["utils.train.run"]  # `from .checkpoints import ...` in a package
    assert "utils.models" in graph["utils.toy"]  # the toy plugin registers its pipelines


def test_utils_has_no_import_cycle():
    """Mutation: `from .models import PipelineParts` inside utils/flow.py's loader (models imports flow) fails here."""
    graph, _ = import_graph()
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_product_imports_nothing_from_the_toy_world():
    """Mutation: `from .toy import world` in utils/data.py (the toyworld prompt set) fails here."""
    graph, known = import_graph()
    product = {m: deps for m, deps in graph.items() if not m.startswith("utils.toy")}
    for script in SCRIPTS:
        product[script] = imported_modules(REPO_ROOT / script, known)
    offenders = {m: sorted(d for d in deps if d.startswith("utils.toy")) for m, deps in product.items()}
    assert not {m: d for m, d in offenders.items() if d}
