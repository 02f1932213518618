"""The shape of the code that the README and STYLE.md promise: the folders are layers and a lower
layer never imports a higher one (no import cycle, gpt2.py stands alone), the root holds the
architecture and the commands only, and no function grows past 100 lines."""
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


# Lowest first. A module may import its own layer and those below it, never one above.
LAYERS = [
    ("the ground floor: the model, and the error types everything raises", ["gpt2", "errors"]),
    ("preferences in, token batches out", ["data"]),
    ("the objectives", ["dpo", "ppo"]),
    ("the training job's parts", ["train"]),
    ("the jobs", ["fsdp_train", "ppo_train"]),
    ("commands above the job: sampling, plots, pair generation, the paper's frontier",
     ["sample", "plot_metrics", "generate_pairs", "frontier"]),
    ("measurements of all of it", ["bench"]),
]


def layer_of(module):
    top = module.split(".")[0]
    return next(i for i, (_, tops) in enumerate(LAYERS) if top in tops)


def test_a_lower_layer_never_imports_a_higher_one():
    upward = [f"{name} (layer {layer_of(name)}: {LAYERS[layer_of(name)][0]}) imports {dep} (layer {layer_of(dep)})"
              for name, deps in project_imports().items() for dep in deps if layer_of(dep) > layer_of(name)]
    assert not upward, upward


def test_the_root_holds_the_architecture_and_the_commands_only():
    root_modules = sorted(p.stem for p in ROOT.glob("*.py"))
    assert root_modules == sorted(top for _, tops in LAYERS for top in tops if (ROOT / f"{top}.py").exists())
    assert len(root_modules) <= 10, root_modules
    assert all((ROOT / folder / "__init__.py").exists() for folder in ("data", "train"))


def test_gpt2_imports_nothing_of_the_project():
    assert project_imports()["gpt2"] == set()


def test_no_function_over_100_lines():
    long = [f"{p.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for p in SOURCES + sorted((ROOT / "tests").glob("*.py"))
            for node in ast.walk(ast.parse(p.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 100]
    assert not long, long
