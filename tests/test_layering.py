"""Dependencies point one way: feature_store and quant import nothing of ours but each other's contracts, ranker
imports feature_store and quant only, nothing imports pipelines. Each library package is imported module by
module in a fresh interpreter, which then reports which of our packages ended up in sys.modules."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = {"feature_store": {"feature_store"}, "quant": {"quant", "feature_store"},
           "ranker": {"ranker", "feature_store", "quant"}}
PROBE = """
import importlib, json, pkgutil, sys
pkg = importlib.import_module(sys.argv[1])
modules = [pkg.__name__] + [m.name for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")]
for name in modules:
    importlib.import_module(name)
ours = sorted({m.split(".")[0] for m in sys.modules} & {"pipelines", "ranker", "quant", "feature_store"})
print(json.dumps({"modules": modules, "ours": ours}))
"""


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_library_imports_no_package_it_must_not(package):
    out = subprocess.run([sys.executable, "-c", PROBE, package], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env={"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(report["modules"]) > 3  # the walk really imported the package's modules
    assert set(report["ours"]) <= ALLOWED[package], (package, report["ours"])
    assert "pipelines" not in report["ours"]


def test_importing_a_library_has_no_side_effects_on_logging():
    code = ("import logging, quant, ranker, feature_store; "
            "print(len(logging.getLogger().handlers), logging.getLogger().level)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["0", str(logging_warning())]


def logging_warning() -> int:
    import logging

    return logging.WARNING


# Inside pipelines the layers point one way too: cli -> jobs -> beam -> library (data, encoder, mining). The scan
# reads every import statement of every module, function-local ones included (a lazy import is still a dependency).
PIPELINE_LAYERS = {"data": 0, "encoder": 0, "mining": 0, "config": 1, "beam": 2, "jobs": 3, "cli": 4}
LIBRARY_FORBIDDEN = ("apache_beam", "argparse")  # the library layers are plain Python: no Beam, no command line


def _imports(path: Path):
    """(line, imported module) for every import in the file, at any depth."""
    import ast

    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module


def _layering_violations(root: Path) -> list[str]:
    out = []
    for path in sorted((root / "pipelines").rglob("*.py")):
        parts = path.relative_to(root).parts
        if len(parts) < 3:  # pipelines/__init__.py
            continue
        layer = parts[1]
        if layer not in PIPELINE_LAYERS:
            out.append(f"{path.relative_to(root)}: in no layer ({sorted(PIPELINE_LAYERS)})")
            continue
        for line, module in _imports(path):
            names = module.split(".")
            where = f"{path.relative_to(root)}:{line} imports {module}"
            if names[0] == "pipelines" and len(names) > 1 and names[1] in PIPELINE_LAYERS:
                if PIPELINE_LAYERS[names[1]] > PIPELINE_LAYERS[layer]:
                    out.append(f"{where} ({layer} may not import the {names[1]} layer)")
            if PIPELINE_LAYERS[layer] == 0 and names[0] in LIBRARY_FORBIDDEN:
                out.append(f"{where} (the {layer} library takes no {names[0]})")
    for package in ALLOWED:  # the library packages, function-local imports included
        for path in sorted((root / package).rglob("*.py")):
            for line, module in _imports(path):
                top = module.split(".")[0]
                if top in {"pipelines", "ranker", "quant", "feature_store"} and top not in ALLOWED[package]:
                    out.append(f"{path.relative_to(root)}:{line} imports {module}")
    return out


def test_every_import_follows_the_layers():
    assert _layering_violations(ROOT) == []


def test_the_scan_sees_function_local_imports(tmp_path):
    """The scan would catch a lazy upward import and a Beam import in a library layer (a fake tree)."""
    (tmp_path / "pipelines" / "encoder").mkdir(parents=True)
    (tmp_path / "pipelines" / "encoder" / "bad.py").write_text(
        "def f():\n    from pipelines.jobs.demo import run\n    import apache_beam\n")
    for package in ALLOWED:
        (tmp_path / package).mkdir()
    (tmp_path / "quant" / "leak.py").write_text("def g():\n    import ranker.train\n")
    found = _layering_violations(tmp_path)
    assert any("pipelines.jobs.demo" in v for v in found)
    assert any("apache_beam" in v for v in found)
    assert any("ranker.train" in v for v in found)


def test_no_two_pipelines_modules_share_a_file_name():
    names = {}
    for path in (ROOT / "pipelines").rglob("*.py"):
        if path.name not in ("__init__.py", "__main__.py"):
            names.setdefault(path.name, []).append(str(path.relative_to(ROOT)))
    assert {n: p for n, p in names.items() if len(p) > 1} == {}


OWN_PACKAGES = ("pipelines", "ranker", "quant", "feature_store")


def _module_file(root: Path, module: str) -> Path | None:
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def _top_level_names(path: Path) -> set[str]:
    """Names a module binds at top level (defs, classes, assignments, imports), read statically."""
    import ast

    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
            # lazy exports (a module __getattr__ serving __all__ or an _EXPORTS table) count as names
            if any(isinstance(t, ast.Name) and t.id in ("__all__", "_EXPORTS") for t in targets) and node.value:
                names.update(c.value for c in ast.walk(node.value)
                             if isinstance(c, ast.Constant) and isinstance(c.value, str))
    return names


def _dangling_imports(root: Path) -> list[str]:
    """Every import of the project's own packages, from any file of the tree (lazy ones and tests included),
    names a module or a name that exists: a moved module cannot leave a caller behind that only a slow test runs."""
    import ast

    out = []
    files = [p for folder in (*OWN_PACKAGES, "tests", "bench", "examples") if (root / folder).exists()
             for p in (root / folder).rglob("*.py")]
    for path in sorted(files):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                pairs = [(alias.name, None) for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                pairs = [(node.module, alias.name) for alias in node.names]
            else:
                continue
            for module, name in pairs:
                if module.split(".")[0] not in OWN_PACKAGES:
                    continue
                where = f"{path.relative_to(root)}:{node.lineno}"
                target = _module_file(root, module)
                if target is None:
                    out.append(f"{where}: no module {module}")
                elif name not in (None, "*") and _module_file(root, f"{module}.{name}") is None \
                        and name not in _top_level_names(target):
                    out.append(f"{where}: {module} has no {name}")
    return out


def test_every_import_of_the_project_resolves():
    assert _dangling_imports(ROOT) == []


def test_the_resolver_sees_a_moved_module(tmp_path):
    (tmp_path / "pipelines" / "jobs").mkdir(parents=True)
    (tmp_path / "pipelines" / "__init__.py").write_text("")
    (tmp_path / "pipelines" / "jobs" / "__init__.py").write_text("")
    (tmp_path / "pipelines" / "jobs" / "cascade.py").write_text("def run():\n    pass\n")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "t.py").write_text(
        "def f():\n    from pipelines import cascade\n    from pipelines.jobs.cascade import run, gone\n")
    found = _dangling_imports(tmp_path)
    assert found == ["tests/t.py:2: pipelines has no cascade", "tests/t.py:3: pipelines.jobs.cascade has no gone"]
