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
