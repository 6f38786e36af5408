"""The import graph of routesae has no cycles, counting imports inside functions too.

A cycle hidden behind an import inside a function still ties two modules into one unit that
cannot be understood or changed apart; only ``if TYPE_CHECKING:`` imports (annotations) are free.
An edge goes from a module to each ``routesae`` module it names and to the sub-packages that
hold it, whose ``__init__`` Python runs first (``routesae.architectures`` registers every built-in
architecture). The top package's ``__init__`` (the public API, which imports everything) is the
one exception: every import runs it, so it is the root of the graph, not part of it.
"""

import ast
from pathlib import Path

import routesae

PACKAGE = Path(routesae.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imported_modules(tree: ast.AST, modules: set[str]) -> set[str]:
    """The routesae modules ``tree`` imports, anywhere but under ``if TYPE_CHECKING:``."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking_only(node):
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("routesae"):
            for alias in node.names:  # ``from routesae.x import y`` names module x.y when y is a module
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    packages = {name.rsplit(".", i)[0] for name in found for i in range(1, name.count("."))}
    return (found | packages) & modules - {"routesae"}


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    graph = {module_name(p): imported_modules(ast.parse(p.read_text()), modules) for p in paths}
    for name in graph:  # a package's own modules import it first, which is no edge back
        graph[name] = {m for m in graph[name] if m != name and not name.startswith(m + ".")}
    del graph["routesae"]
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path of modules (first == last), or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_graph_has_no_cycles():
    graph = import_graph()
    assert "routesae.train" in graph and "routesae.rundir" in graph["routesae.train"], "the walk sees the modules"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
