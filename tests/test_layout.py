"""The shape of the code that the README and STYLE.md promise: data flows one way (no import
cycle, gpt2.py stands alone), and no function grows past 100 lines."""
import ast

from conftest import ROOT

SOURCES = sorted(p for p in ROOT.rglob("*.py") if "tests" not in p.relative_to(ROOT).parts)


def module_name(path):
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    return name.removesuffix(".__init__")


def project_imports():
    modules = {module_name(p): p for p in SOURCES}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.ImportFrom) and node.module:
                found |= {node.module} & modules.keys()
                found |= {f"{node.module}.{a.name}" for a in node.names} & modules.keys()
        graph[name] = found
    return graph


def test_no_import_cycle():
    graph, done, cycles = project_imports(), set(), []

    def visit(name, path):
        if name in path:
            cycles.append(path[path.index(name):] + [name])
            return
        if name in done:
            return
        for dependency in graph[name]:
            visit(dependency, path + [name])
        done.add(name)

    for name in graph:
        visit(name, [])
    assert not cycles, cycles
    assert len(graph) >= 15


def test_gpt2_imports_nothing_of_the_project():
    assert project_imports()["gpt2"] == set()


def test_no_function_over_100_lines():
    long = [f"{p.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for p in SOURCES + sorted((ROOT / "tests").glob("*.py"))
            for node in ast.walk(ast.parse(p.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 100]
    assert not long, long
