"""The layers of docs/architecture.md hold: import-linter's contracts (pyproject.toml) pass, and can fail."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _lint(cwd: Path, pythonpath: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    # The `lint-imports` console script, run by this interpreter (the one the suite runs in).
    code = "import sys; from importlinter.cli import lint_imports_command; sys.argv = ['lint-imports']; lint_imports_command()"
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_import_contracts_are_kept():
    proc = _lint(ROOT, ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "4 kept, 0 broken" in proc.stdout


@pytest.mark.parametrize("module, upward", [
    ("physics/refine.py", "from ptycho_ml.model.network import DiffractionToObject"),  # physics -> model
    ("model/training.py", "from ptycho_ml.inference.evaluate import evaluate_model"),  # model -> inference
    ("physics/forward.py", "import mlflow"),  # physics -> MLflow
])
def test_an_upward_import_breaks_the_contract(tmp_path, module, upward):
    shutil.copytree(ROOT / "ptycho_ml", tmp_path / "ptycho_ml", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / "ptycho_ml" / module
    target.write_text(target.read_text() + f"\n{upward}\n")
    proc = _lint(tmp_path, tmp_path)
    assert proc.returncode != 0 and "broken" in proc.stdout, proc.stdout + proc.stderr


def test_public_api_is_importable_from_the_package_and_lazy():
    """`from ptycho_ml import train, ...` works, and `import ptycho_ml` alone loads no torch or MLflow."""
    import ptycho_ml

    assert set(ptycho_ml.__all__) == {"__version__", *ptycho_ml._API}
    for name in ptycho_ml._API:
        assert getattr(ptycho_ml, name).__name__ == name
    code = "import sys, ptycho_ml; print(sorted({'torch', 'mlflow', 'lightning'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout.strip()
    assert out == "[]"
