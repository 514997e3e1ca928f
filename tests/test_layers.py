"""The package's layers (docs/architecture.md): each folder imports only the layers below it, and no
module imports itself back through others (no import circle), counting imports inside functions.

    cli, __main__                        entry points
    commands/                            one workflow per CLI command
    engine/                              training, inference, checkpoints, tracking
    data/  networks/  evaluation/  phantom/    building blocks; siblings do not import each other
    io/                                  files, exam folders, run folders
    config  labels  errors  registry     the foundation
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mtl_meniscus"
LAYERS = {
    "cli": 6,
    "__main__": 7,
    "commands": 5,
    "engine": 4,
    "data": 3,
    "networks": 3,
    "evaluation": 3,
    "phantom": 3,
    "io": 2,
    "config": 1,
    "labels": 1,
    "errors": 1,
    "registry": 1,
    "__init__": 1,
}


def module_name(path: Path, root: Path = PACKAGE) -> str:
    """'engine.trainer' for mtl_meniscus/engine/trainer.py; 'data' for mtl_meniscus/data/__init__.py."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def package_imports(path: Path, known: set[str], root: Path = PACKAGE) -> set[str]:
    """The package modules (names as module_name gives them) that `path` imports, at any depth."""
    here = module_name(path, root).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = set()

    def add(dotted: str, names=()):
        for name in names:  # `from mtl_meniscus.data import records` imports a module
            if f"{dotted}.{name}".strip(".") in known:
                found.add(f"{dotted}.{name}".strip("."))
                return
        if dotted in known:
            found.add(dotted)

    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            names = [a.name for a in node.names]
            if node.level:
                base = package[: len(package) - node.level + 1]
                add(".".join(base + ([node.module] if node.module else [])), names)
            elif node.module and node.module.split(".")[0] == "mtl_meniscus":
                add(node.module.partition(".")[2], names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("mtl_meniscus."):
                    add(alias.name.partition(".")[2])
    found.discard(module_name(path, root))
    return found


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    paths = {module_name(p, root): p for p in root.rglob("*.py")}
    paths.pop("__init__", None)
    return {name: package_imports(path, set(paths), root) for name, path in paths.items()}


def layer_breaches(graph: dict[str, set[str]]) -> list[str]:
    breaches = []
    for name, imported in graph.items():
        top = name.split(".")[0]
        for other in imported:
            other_top = other.split(".")[0]
            if other_top == top and top != "commands":
                continue  # modules of one folder use each other (circles are checked separately)
            if top == "commands" and other_top == "commands":
                # a command package (compare/) uses its own parts; commands never use each other
                if name.split(".")[:2] != other.split(".")[:2]:
                    breaches.append(f"{name} imports the command {other}")
                continue
            if LAYERS[other_top] >= LAYERS[top] and not (LAYERS[top] == LAYERS[other_top] == 1):
                breaches.append(f"{name} (layer {top}) imports {other} (layer {other_top})")
    return breaches


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    circles, state = [], {}

    def visit(name, trail):
        state[name] = "open"
        for other in sorted(graph.get(name, ())):
            if state.get(other) == "open":
                circles.append(trail[trail.index(other) :] + [other])
            elif other not in state:
                visit(other, trail + [other])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    return circles


def test_every_folder_has_a_layer():
    tops = {name.split(".")[0] for name in import_graph()}
    assert tops <= set(LAYERS), f"modules outside the known layers: {sorted(tops - set(LAYERS))}"


def test_each_layer_imports_only_the_layers_below_it():
    assert layer_breaches(import_graph()) == []


def test_no_import_circle():
    assert import_circles(import_graph()) == []


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_the_checks_see_imports_at_any_depth_relative_or_absolute(tmp_path):
    root = _write(
        tmp_path,
        {
            "__init__.py": "",
            "data/__init__.py": "",
            "data/folder.py": "from .records import x\n",
            "data/records.py": "def f():\n    from mtl_meniscus.data.folder import y\n",
            "networks/models.py": "from mtl_meniscus.data import folder\n",
            "commands/__init__.py": "",
            "commands/evaluate.py": "import mtl_meniscus.commands.predict\n",
            "commands/predict.py": "from ..engine import trainer\n",
            "engine/trainer.py": "",
        },
    )
    graph = import_graph(root)
    assert graph["data.folder"] == {"data.records"}
    assert graph["data.records"] == {"data.folder"}  # inside a function
    assert graph["networks.models"] == {"data.folder"}
    assert graph["commands.predict"] == {"engine.trainer"}
    assert import_circles(graph) == [["data.folder", "data.records", "data.folder"]]
    assert sorted(layer_breaches(graph)) == [
        "commands.evaluate imports the command commands.predict",
        "networks.models (layer networks) imports data.folder (layer data)",
    ]


MAX_FUNCTION_LINES = 60  # engine and command layers: a longer function is split into named steps


def long_functions(root: Path, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """'file:line name (N lines)' for every function or method over `limit` lines (signature and
    docstring included) in the engine and command layers."""
    found = []
    for layer in ("engine", "commands"):
        for path in sorted((root / layer).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > limit:
                        found.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_no_function_over_the_limit_in_the_engine_and_command_layers():
    assert long_functions(PACKAGE) == []


def test_the_length_check_counts_methods_and_nested_functions(tmp_path):
    body = "\n".join(f"        x{k} = {k}" for k in range(MAX_FUNCTION_LINES))
    _write(
        tmp_path,
        {"engine/a.py": f"class A:\n    def long(self):\n{body}\n", "commands/b.py": "def f():\n    pass\n"},
    )
    assert long_functions(tmp_path) == [f"engine/a.py:2 long ({MAX_FUNCTION_LINES + 1} lines)"]
