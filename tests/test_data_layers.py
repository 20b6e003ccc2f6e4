"""``ivfast/data`` is layered: every import between its modules sits at module top and points
down, so the import graph has no cycle (an import inside a function can hide one)."""
from __future__ import annotations

import ast
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "ivfast" / "data"

# Bottom to top; a module imports only modules of lower layers.
LAYERS = [
    {"sources", "sampling", "synth"},    # where a sample's bytes are; clip sampling; test clips
    {"index"},                           # lists, probe, cache
    {"pyav", "dali"},                    # decoders
    {"loader"},
    {"prepare", "shards"},               # tools: re-encode one file; pack shards
    {"plan"},                            # measures prepare's outputs through the loader
    {"__main__"},                        # the commands
]


def data_imports(pkg: Path) -> dict[str, list[tuple[str, bool]]]:
    """{module: [(imported module of the package, inside a function)]} for every ``pkg/*.py``
    except ``__init__`` (the package's lazy exports point down by construction)."""
    mods = {p.stem for p in pkg.glob("*.py")}
    dotted = "ivfast." + pkg.name
    graph: dict[str, list[tuple[str, bool]]] = {}

    def targets(node) -> list[str]:
        if isinstance(node, ast.Import):
            return [a.name[len(dotted) + 1:].split(".")[0] for a in node.names if a.name.startswith(dotted + ".")]
        if node.level == 1 or (node.level == 0 and (node.module or "").split(".")[:2] == dotted.split(".")):
            rest = (node.module or "")[len(dotted):].lstrip(".") if node.level == 0 else (node.module or "")
            if rest:
                return [rest.split(".")[0]]
            return [a.name if a.name in mods else "__init__" for a in node.names]
        return []

    def walk(node, mod: str, nested: bool) -> None:
        for ch in ast.iter_child_nodes(node):
            inner = nested or isinstance(ch, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(ch, (ast.Import, ast.ImportFrom)):
                graph[mod].extend((t, inner) for t in targets(ch))
            walk(ch, mod, inner)

    for p in sorted(pkg.glob("*.py")):
        if p.stem != "__init__":
            graph[p.stem] = []
            walk(ast.parse(p.read_text()), p.stem, False)
    return graph


def problems(graph: dict[str, list[tuple[str, bool]]], layers: list[set[str]] | None = None) -> list[str]:
    out = [f"{m} imports {t} inside a function (move it to the module top)"
           for m, edges in graph.items() for t, nested in edges if nested]
    out += [f"{m} imports the package ivfast.data (import the module that defines the name)"
            for m, edges in graph.items() for t, _ in edges if t == "__init__"]
    # a cycle: depth-first search, grey = on the current path
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t, _ in graph.get(m, []):
            if state.get(t) == 1:
                out.append("import cycle: " + " -> ".join(path[path.index(t):] + [t]))
            elif t in graph and not state.get(t):
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(graph):
        if not state.get(m):
            visit(m, [m])
    if layers is not None:
        rank = {m: i for i, layer in enumerate(layers) for m in layer}
        out += [f"{m} is in no layer of LAYERS (place it)" for m in graph if m not in rank]
        out += [f"{m} (layer {rank[m]}) imports {t} (layer {rank[t]}): imports must point down"
                for m, edges in graph.items() for t, _ in edges
                if m in rank and t in rank and rank[t] >= rank[m] and t != m]
    return list(dict.fromkeys(out))


def test_data_modules_are_layered():
    graph = data_imports(DATA)
    assert {"sources", "index", "pyav", "loader", "shards"} <= set(graph)     # the scan found the package
    assert ("sources", False) in graph["index"]                              # and its top-level imports
    assert problems(graph, LAYERS) == []


def test_the_check_finds_a_hidden_cycle_and_a_nested_import(tmp_path):
    pkg = tmp_path / "data"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import f\n")
    (pkg / "b.py").write_text("def f():\n    from .a import g\n    return g\n")
    (pkg / "c.py").write_text("from . import a\n\n\ndef h():\n    import ivfast.data.b\n")
    found = problems(data_imports(pkg), [{"a"}, {"b"}, {"c"}])
    assert "b imports a inside a function (move it to the module top)" in found
    assert "c imports b inside a function (move it to the module top)" in found
    assert "import cycle: a -> b -> a" in found
    assert "a (layer 0) imports b (layer 1): imports must point down" in found
    assert not any(p.startswith("b (layer") or p.startswith("c (layer") for p in found), found   # down is fine
