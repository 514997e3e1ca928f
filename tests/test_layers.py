"""The package's layers (README, "Layout"): command modules never import each other.

cli.py -> command modules (one per command's workflow) -> the training engine (train.py) and the
building blocks below it. Whatever two commands share lives below them (e.g. trained.py).
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mtl_meniscus"
COMMANDS = {"evaluate", "predict", "compare", "bench", "export", "tune", "fastmri"}
ENTRY_POINTS = {"cli", "__main__"}


def package_imports(module: Path) -> set[str]:
    """Names of the package's modules that `module` imports (relative or absolute, at any depth)."""
    names = set()
    for node in ast.walk(ast.parse(module.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:  # from .x import y
                names.add(node.module.split(".")[0])
            elif node.level == 1:  # from . import x
                names.update(alias.name for alias in node.names)
            elif node.module and node.module.startswith("mtl_meniscus."):
                names.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            names.update(a.name.split(".")[1] for a in node.names if a.name.startswith("mtl_meniscus."))
    return names


def test_commands_import_only_lower_layers():
    modules = {p.stem: package_imports(p) for p in PACKAGE.glob("*.py")}
    assert COMMANDS <= set(modules)
    for name, imported in modules.items():
        if name in ENTRY_POINTS:
            continue
        assert not imported & ENTRY_POINTS, f"{name} imports the CLI"
        assert not imported & COMMANDS, f"{name} imports the command module(s) {sorted(imported & COMMANDS)}"


def test_the_check_sees_relative_and_absolute_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text(
        "from .evaluate import x\nfrom . import predict\nimport mtl_meniscus.compare\n"
        "def f():\n    from mtl_meniscus.bench import y\n"
    )
    assert package_imports(module) == {"evaluate", "predict", "compare", "bench"}
