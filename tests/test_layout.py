"""The package's shape, read from its source: imports point one way, Ray stays at the edges, no module reaches into
another's private names, nothing imports in a circle, and files and functions stay small (ARCHITECTURE.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "idengine"

LAYERS = ("", "data", "models", "features", "train", "evaluate", "reference", "deploy", "report", "recipes", "cli")
"""The order data flows in; a module may import from its own layer or an earlier one, never a later one.
"" is the top-level foundation (config, layout, storage, errors)."""

RAY_ALLOWED = ("features/", "train/ray_train.py", "deploy/predict.py", "recipes/")
"""The only places that import Ray (jobs/ and the tests too, outside the package)."""

MAX_FILE_LINES, MAX_FUNCTION_LINES = 400, 60


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def layer_of(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return 0
    name = parts[1]
    return LAYERS.index(name) if name in LAYERS else 0


def imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, names imported from it, line) of every import in a file, lazy ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, [alias.name for alias in node.names], node.lineno))
    return found


def idengine_imports(path: Path, known: dict[str, Path]) -> list[tuple[str, list[str], int]]:
    """Imports of idengine modules, with `from idengine.x import module` resolved to the module itself."""
    out = []
    for module, names, line in imports(path):
        if not module.startswith("idengine"):
            continue
        submodules = [f"{module}.{n}" for n in names if f"{module}.{n}" in known]
        out += [(m, [], line) for m in submodules] or [(module, names, line)]
    return out


def test_imports_point_one_way():
    known = modules()
    wrong = []
    for module, path in known.items():
        for target, _, line in idengine_imports(path, known):
            if layer_of(target) > layer_of(module):
                wrong.append(f"{module}:{line} imports {target} (layer {LAYERS[layer_of(target)]!r} comes after "
                             f"{LAYERS[layer_of(module)]!r})")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    known = modules()
    graph = {m: {t for t, _, _ in idengine_imports(p, known) if t in known and t != m} for m, p in known.items()}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join(trail[trail.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_no_module_imports_another_modules_private_names():
    known = modules()
    wrong = []
    for module, path in known.items():
        tree = ast.parse(path.read_text())
        imported = {}
        for target, names, line in idengine_imports(path, known):
            wrong += [f"{module}:{line} imports {target}.{n}" for n in names if n.startswith("_")]
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("idengine"):
                imported.update({a.asname or a.name: f"{node.module}.{a.name}" for a in node.names})
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.attr.startswith("_") \
                    and imported.get(node.value.id) in known and not node.attr.startswith("__"):
                wrong.append(f"{module}:{node.lineno} reads {node.value.id}.{node.attr}")
    assert not wrong, "\n".join(wrong)


def test_ray_is_imported_only_at_the_edges():
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE).as_posix()
        uses_ray = any(m == "ray" or m.startswith("ray.") for m, _, _ in imports(path))
        if uses_ray and not relative.startswith(RAY_ALLOWED):
            wrong.append(relative)
    assert not wrong, f"Ray imported outside {RAY_ALLOWED}: {wrong}"


def test_files_and_functions_stay_small():
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        if text.count("\n") > MAX_FILE_LINES:
            wrong.append(f"{path.relative_to(PACKAGE)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    wrong.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}: {length} lines")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("needle, home", [
    ("SimpleFastaParser", "data/fasta.py"),                 # FASTA parsing
    ("PICKLE_TRUSTED_BACKBONES", "models/transformer.py"),  # the pickle rule
    ("os.replace(", "storage.py"),                          # atomic publishing
    ("argsort(-np.asarray(lengths", "models/inference.py"),  # length-sorted batching
    ("def check_sequence", "data/clean.py"),                # what a usable sequence is
    ("def assign_calls", "evaluate/calls.py"),              # calls with rank fallback
    ("def calls_summary", "evaluate/calls.py"),
    ("def file_sha256", "storage.py"),
    ("def train_eval_sample", "data/splits.py"),            # the gap's training sample
    ("def fold_rows", "data/splits.py"),                    # a fold's training and validation rows
    ("Figure(", "report/plots.py"),                         # every plot
])
def test_each_concept_has_one_home(needle, home):
    found = sorted(p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py") if needle in p.read_text())
    assert found == [home], f"{needle!r} found in {found}, expected only in {home}"
