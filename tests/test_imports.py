"""The project's layout, read from its own source with ast (nothing is imported): the imports point
one way, tools → scripts → flowkit and flow_layers, with no circle, and no definition runs long.
Imports inside functions count as much as those at the top."""
import ast
import glob
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {"nice", "glow", "fvae", "iresnet", "tarflow"}
LONGEST = 100  # lines of one class or function


def project_modules():
    """{module name: path} of every .py at the top, in flowkit/ and in tools/."""
    found = {}
    for pattern in ("*.py", "flowkit/*.py", "tools/*.py"):
        for path in glob.glob(os.path.join(ROOT, pattern)):
            name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
            found[name.removesuffix(".__init__")] = path
    return found


MODULES = project_modules()


def imported(name, path):
    """The project modules that `name` imports anywhere in its file (a package's __init__ counts as
    the package)."""
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            candidates = [base, *(f"{base}.{a.name}" for a in node.names)]
        else:
            continue
        for c in candidates:
            while c and c not in MODULES:
                c = c.rpartition(".")[0]
            if c and c != name:
                targets.add(c)
    return targets


GRAPH = {name: imported(name, path) for name, path in MODULES.items()}


def kind(name):
    top = name.split(".")[0]
    return "script" if name in SCRIPTS else top if top in ("flowkit", "tools") else name


def test_the_top_level_holds_the_five_articles_and_their_layers():
    assert sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "*.py"))) == sorted(
        [f"{s}.py" for s in SCRIPTS] + ["flow_layers.py"])


def circles(graph):
    """The import circles of {module: modules it imports}, by depth-first search: a module met again
    while it is still on the path closes one."""
    found, state = [], {}

    def visit(name, path):
        state[name] = "open"
        for other in sorted(graph[name]):
            if state.get(other) == "open":
                found.append(" → ".join(path[path.index(other):] + [other]))
            elif other not in state:
                visit(other, path + [other])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    return found


def test_no_import_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a → b → c → a"]  # the search finds one
    assert circles(GRAPH) == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_point_one_way(name):
    """flowkit imports nothing above it, flow_layers only flowkit.backend (the backends' own APIs) and
    flowkit.kernels (the float64-exact mean and matmul); a script imports flowkit and flow_layers, f-VAE
    Glow's model too; only the tools import the scripts."""
    if name == "flow_layers":
        assert GRAPH[name] <= {"flowkit", "flowkit.backend", "flowkit.kernels"}, GRAPH[name]
        return
    allowed = {"flowkit": {"flowkit"},
               "script": {"flowkit", "flow_layers"} | ({"script"} if name == "fvae" else set()),
               "tools": {"flowkit", "flow_layers", "script", "tools"}}[kind(name)]
    wrong = sorted(t for t in GRAPH[name] if kind(t) not in allowed or (name == "fvae" and t in SCRIPTS - {"glow"}))
    assert wrong == [], f"{name} imports {wrong}"


def test_fvae_takes_its_prior_from_glow():
    assert "glow" in GRAPH["fvae"]


def commands():
    """The scripts and tools run as commands: those with a `__main__` block."""
    return sorted(n for n, path in MODULES.items() if kind(n) in ("script", "tools")
                  and 'if __name__ == "__main__":' in open(path, encoding="utf-8").read())


@pytest.mark.parametrize("name", commands())
def test_tensorflow_starts_through_flowkit(name):
    """flowkit's __init__ imports TensorFlow with its C++ start-up notices kept off stderr. TensorFlow
    2.21 writes them (8 lines) while its library loads, before any log level applies, and nothing of
    ours runs before a command's first import: so in a script or a tool, the first import that loads
    TensorFlow (keras, tensorflow, or a module of ours that imports them) is flowkit's."""
    loads_tf = {"keras", "tensorflow", "flow_layers", *SCRIPTS, "tools"}
    for node in ast.parse(open(MODULES[name], encoding="utf-8").read()).body:
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module] if isinstance(node, ast.ImportFrom) else [])
        tops = {n.split(".")[0] for n in names}
        if "flowkit" in tops:
            return
        assert not tops & loads_tf, f"{name} imports {sorted(tops & loads_tf)} before flowkit"


def definitions():
    for path in [*MODULES.values(), *glob.glob(os.path.join(ROOT, "tests", "*.py"))]:
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                yield os.path.relpath(path, ROOT), node


def test_no_class_or_function_is_longer_than_100_lines():
    long = [f"{path}: {node.name} ({node.end_lineno - node.lineno + 1} lines)" for path, node in definitions()
            if node.end_lineno - node.lineno + 1 > LONGEST]
    assert long == []


def test_the_graph_is_read_from_the_code():
    """The reader sees what is there: imports at the top, one inside a function (flowkit.curves reads
    the sample score lazily), a package and its modules."""
    assert {"flowkit.cli", "flowkit.files"} <= GRAPH["nice"] and "flowkit.files" in GRAPH["flowkit.cli"]
    assert "flowkit.score" in GRAPH["flowkit.curves"]
    assert {"nice", "tarflow", "tools.measure"} <= GRAPH["tools.bench"]
    assert len([d for d in definitions()]) > 300
