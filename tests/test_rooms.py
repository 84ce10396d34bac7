"""The rooms hold what they say: every function readable in one screen, no module too long to read, no import
circle, the layers in one direction (flows -> tasks -> xai_methods, storage, zoo), and one table of protocols
that the flows, the command line and the report all read."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("flows", "tasks", "storage", "xai_methods", "zoo")
LAYER = {"flows": 2, "tasks": 1, "storage": 0, "xai_methods": 0, "zoo": 0}  # imports only go down (or across 0)


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules `name` imports, at its top or inside a function."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def test_every_function_fits_one_screen():
    long = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not long, long


def test_no_module_is_too_long_to_read():
    limit = {"xai_methods": 750}  # a method family's file may stay whole
    long = [f"{name}: {n} lines" for name, path in modules().items()
            if (n := len(path.read_text().splitlines())) > limit.get(name.split(".")[0], 450)]
    assert not long, long


def test_no_import_circle_and_layers_point_down():
    known = modules()
    graph = {name: imports(name, path, known) for name, path in known.items()}
    upward = [f"{a} -> {b}" for a, targets in graph.items() for b in targets
              if LAYER[b.split(".")[0]] > LAYER[a.split(".")[0]]]
    assert not upward, upward
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path + [node, nxt]
            if nxt not in state and (circle := visit(nxt, path + [node])):
                return circle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            circle = visit(start, [])
            assert circle is None, " -> ".join(circle[circle.index(circle[-1]):])


def test_the_detector_finds_a_circle(tmp_path):
    """The import graph above is real: two modules importing each other are one circle."""
    (tmp_path / "a.py").write_text("from zoo import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from zoo import a\n")
    known = {"zoo.a": tmp_path / "a.py", "zoo.b": tmp_path / "b.py"}
    assert imports("zoo.a", known["zoo.a"], known) == {"zoo.b"}
    assert imports("zoo.b", known["zoo.b"], known) == {"zoo.a"}


@pytest.mark.parametrize("name", ["sanity", "invariance", "manipulate", "roar", "resilience"])
def test_one_row_of_the_protocol_table_makes_the_flow_the_command_and_the_figure(name, capsys):
    import flows.protocols
    from flows.cli import build_parser
    from tasks.protocols import PROTOCOLS
    from tasks.spec import RunSpec, options_of

    p = PROTOCOLS[name]
    assert flows.protocols.FLOWS[name].name == name and getattr(flows.protocols, name) is flows.protocols.FLOWS[name]
    flow_params = set(flows.protocols.FLOWS[name].parameters.properties)
    assert flow_params == set(options_of(p.spec)) >= set(options_of(RunSpec))  # the form: every option
    with pytest.raises(SystemExit):
        build_parser().parse_args([name, "--help"])
    text = capsys.readouterr().out
    assert p.help[1:40] in text and "--input-size" in text and "--dask-address" in text
    assert callable(p.plot) and callable(p.open_store) and callable(p.stages)
