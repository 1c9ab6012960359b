"""The house's structure, read from the source with `ast` (nothing is imported): no import circle
among tlkit's modules, counting the imports inside functions too (a lazy import hides a circle from
Python at import time, not from a reader).

An edge A -> B is any `import tlkit.B` / `from tlkit.B import x` / `from tlkit import B` in A's file.
A package's own execution before its submodule's (`tlkit.tune` before `tlkit.tune.search`) is not an
edge: Python runs a package's __init__ first whoever imports the submodule, and that is safe as long
as the submodule needs nothing from __init__; `from tlkit.tune import TuneError` inside a submodule
is an edge to the package, so the ordering trick that needed TuneError defined before the imports
shows as a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "tlkit"


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imported_modules(name: str, path: Path, modules: set[str]) -> set[str]:
    """The tlkit modules that module `name` imports anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    edges = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            edges.update(alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # a relative import: from its own package upwards
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                if submodule in modules:
                    edges.add(submodule)  # from tlkit import stream: the module stream
                elif base in modules:
                    edges.add(base)  # from tlkit.data import DataError: the module data
    edges.discard(name)
    return edges


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imported_modules(name, path, set(files)) for name, path in files.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan's algorithm), each as a path
    A -> B -> ... -> A through the group, so that the message names the imports to cut."""
    index, low, on_stack, stack, groups = {}, {}, set(), [], []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_cycle_through(graph, group) for group in groups]


def _cycle_through(graph, group: set[str]) -> list[str]:
    """A shortest path from the group's first module back to itself, inside the group."""
    start = min(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph[node] & group):
                if nxt == start:
                    return paths[node] + [start]
                if nxt not in paths:
                    paths[nxt] = paths[node] + [nxt]
                    following.append(nxt)
        frontier = following
    return sorted(group)


def test_the_graph_sees_lazy_and_relative_imports(tmp_path):
    """The reader itself: an import inside a function counts, and a circle is named as a path."""
    (tmp_path / "a.py").write_text("def f():\n    from tlkit import b\n")
    (tmp_path / "b.py").write_text("from tlkit.a import f\n")
    modules = {"tlkit", "tlkit.a", "tlkit.b"}
    graph = {"tlkit.a": imported_modules("tlkit.a", tmp_path / "a.py", modules),
             "tlkit.b": imported_modules("tlkit.b", tmp_path / "b.py", modules), "tlkit": set()}
    assert graph["tlkit.a"] == {"tlkit.b"} and graph["tlkit.b"] == {"tlkit.a"}
    assert circles(graph) == [["tlkit.a", "tlkit.b", "tlkit.a"]]


def test_no_import_circle_among_tlkit_modules():
    graph = import_graph()
    assert "tlkit.cli" in graph and graph["tlkit.cli"], "the graph found no imports: the reader is broken"
    found = circles(graph)
    assert not found, "import circle(s): " + "; ".join(" -> ".join(path) for path in found)


# --- which kind of image data: asked in sources.py alone ------------------------------------------

# The kinds of a split (sources.py) and numpy's array type, which `sources.of` makes a Source.
KINDS = ("ImageFiles", "InMemory", "Source", "ndarray")
# serving.py reads a request's rows (bytes or a pixel array per row), not a split: the served model
# is bundled without tlkit, so it cannot ask sources.py.
MAY_ASK = {"tlkit.sources": "the data-source module", "tlkit.serving": "a request's rows, not a split"}


def kind_questions(path: Path) -> list[str]:
    """`isinstance(x, K)` calls in the file with K (or a tuple holding K) naming one of KINDS, each as
    'file:line: call'."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "isinstance" \
                and len(node.args) == 2:
            named = {n.attr if isinstance(n, ast.Attribute) else n.id
                     for n in ast.walk(node.args[1]) if isinstance(n, (ast.Name, ast.Attribute))}
            if named & set(KINDS):
                found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_kind_questions_are_found(tmp_path):
    (tmp_path / "m.py").write_text("import numpy as np\ndef f(x):\n    return isinstance(x, (list, np.ndarray))\n"
                                   "def g(x):\n    return isinstance(x, dict) or isinstance(x, sources.ImageFiles)\n")
    assert kind_questions(tmp_path / "m.py") == ["m.py:3: isinstance(x, (list, np.ndarray))",
                                                 "m.py:5: isinstance(x, sources.ImageFiles)"]


def test_only_the_data_source_module_asks_which_kind_of_image_data_it_has():
    """Arrays in memory or files streamed: sources.Source answers for both (read, take, mirror,
    in_memory, hash_into, ...); a module that asks isinstance(x, ImageFiles) or isinstance(x,
    np.ndarray) is making the choice again."""
    asked = [f"{name}: {question}" for name, path in module_files().items() if name not in MAY_ASK
             for question in kind_questions(path)]
    assert not asked, "ask the sources.Source instead:\n" + "\n".join(asked)
