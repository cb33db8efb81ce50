"""docs/design.md against the code (issue 39): its file table (§1, "The shape") names paths that exist
and every module there is, and its table of log-determinants (§3) names every flow layer of
flow_layers.py and nothing else."""
import glob
import inspect
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DESIGN = os.path.join(ROOT, "docs", "design.md")


def section(number):
    """The text of design.md's section `## number. ...`, up to the next `## `."""
    with open(DESIGN, encoding="utf-8") as f:
        text = f.read()
    found = re.search(rf"^## {number}\. .*?(?=^## |\Z)", text, flags=re.S | re.M)
    assert found, f"design.md has no section {number}"
    return found[0]


def first_cells(text):
    """The first cell of every body row of the markdown tables in `text`."""
    cells = []
    for line in text.splitlines():
        if line.startswith("|") and not re.match(r"\|\s*-", line):
            cells.append(line.split("|")[1].strip())
    return cells


def shape_paths():
    """The paths the file table of §1 names: every `code` span of its rows' first cells."""
    return [p for cell in first_cells(section(1)) for p in re.findall(r"`([^`]+)`", cell)]


def test_the_file_table_names_paths_that_exist():
    paths = shape_paths()
    assert len(paths) >= 10, paths
    missing = [p for p in paths if not os.path.exists(os.path.join(ROOT, p))]
    assert not missing, f"design.md §1 names paths that do not exist: {missing}"


def test_every_module_is_in_the_file_table():
    """Each top-level script and each flowkit module has its row (or a place in a row); each tool module
    is named in the `tools/` row."""
    listed = set(shape_paths())
    modules = [os.path.relpath(p, ROOT) for p in sorted(glob.glob(os.path.join(ROOT, "*.py")))]
    modules += [os.path.relpath(p, ROOT) for p in sorted(glob.glob(os.path.join(ROOT, "flowkit", "*.py")))
                if os.path.basename(p) != "__init__.py"]
    unlisted = [m for m in modules if m not in listed]
    assert not unlisted, f"design.md §1's table does not list {unlisted}"
    tools_row = next(line for line in section(1).splitlines() if line.startswith("| `tools/`"))
    tools = [os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "tools", "*.py"))
             if os.path.basename(p) != "__init__.py"]
    unnamed = [t for t in tools if f"tools.{t}" not in tools_row and f"tools/{t}.py" not in tools_row]
    assert not unnamed, f"design.md §1's tools/ row does not name {unnamed}"


def layer_table_names():
    """The layer names of §3's table of log-determinants (the rows after its `| layer |` header)."""
    text = section(3)
    start = text.index("| layer |")
    table = text[start:].split("\n\n")[0]
    return {name for cell in first_cells(table)[1:] for name in re.findall(r"`([A-Z]\w*)`", cell)}


def test_the_layer_table_names_every_flow_layer():
    import flow_layers

    defined = {name for name, cls in vars(flow_layers).items()
               if inspect.isclass(cls) and cls.__module__ == flow_layers.__name__
               and issubclass(cls, flow_layers.FlowLayer) and cls is not flow_layers.FlowLayer}
    named = layer_table_names()
    assert defined - named == set(), f"flow layers missing from design.md §3's table: {sorted(defined - named)}"
    assert named - defined == set(), f"design.md §3's table names no flow layer of flow_layers.py: {sorted(named - defined)}"
