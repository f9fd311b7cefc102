"""python_env.yaml, conda.yaml, pyproject.toml and MLproject agree with each other."""

import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def _python_env():
    return yaml.safe_load((ROOT / "python_env.yaml").read_text())


def _conda_pip():
    conda = yaml.safe_load((ROOT / "conda.yaml").read_text())
    pip = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict) and "pip" in d)
    python = next(d for d in conda["dependencies"] if isinstance(d, str) and d.startswith("python="))
    return pip, python.split("=", 1)[1]


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_python_is_pinned_to_a_full_version_everywhere():
    env = _python_env()
    _, conda_python = _conda_pip()
    assert env["python"].count(".") == 2, "mlflow run needs a full version that pyenv has, e.g. 3.11.7"
    assert conda_python == env["python"]
    assert Version(env["python"]) in Requirement(f"python{_pyproject()['requires-python']}").specifier


def test_conda_and_python_env_list_the_same_packages():
    pip, _ = _conda_pip()
    assert pip == _python_env()["dependencies"]


def test_python_env_satisfies_pyproject():
    runtime = {Requirement(r).name: Requirement(r) for r in _pyproject()["dependencies"]}
    env = {Requirement(r).name: Requirement(r) for r in _python_env()["dependencies"]}
    assert set(env) == set(runtime)
    # torch is pinned to the CPU wheel in the environments; the package keeps a range it satisfies.
    pinned = next(iter(env["torch"].specifier)).version
    assert Version(pinned) in runtime["torch"].specifier
    for name, req in env.items():
        if name != "torch":
            assert req.specifier == runtime[name].specifier, name
    assert "<3.18" in str(runtime["mlflow"].specifier)


def test_mlproject_uses_python_env_and_has_the_entry_points():
    project = yaml.safe_load((ROOT / "MLproject").read_text())
    assert project["python_env"] == "python_env.yaml"
    assert {"main", "simulate", "evaluate", "reconstruct"} <= set(project["entry_points"])
    main = project["entry_points"]["main"]["parameters"]
    assert main["backend"]["default"] == "torch" and main["register_as"]["default"] == "ptychopinn"
    assert {"data", "epochs", "gridsize", "preset", "seed"} <= set(main)


def _torch_pin() -> str:
    return next(d for d in _python_env()["dependencies"] if d.startswith("torch=="))


def test_one_torch_pin_everywhere():
    """python_env.yaml holds the pin; every other file that spells one (README, docs, CI, benchmarks) agrees."""
    import re

    pin = _torch_pin()
    assert re.fullmatch(r"torch==\d+\.\d+\.\d+", pin)
    readme = (ROOT / "README.md").read_text()
    assert f"pip install {pin} && pip install -e \".[dev]\" && mlflow run . -P backend=torch" in readme
    assert f"pip install {pin} && pip install -e \".[dev]\" && python -m pytest" in readme
    files = [ROOT / "README.md", ROOT / "conda.yaml", ROOT / ".ci" / "run", *sorted((ROOT / "docs").glob("*.md")),
             *sorted((ROOT / "benchmarks").glob("*.py")), *sorted((ROOT / "ptycho_ml").rglob("*.py"))]
    for path in files:
        for found in re.findall(r"torch==[\d.]*\d", path.read_text()):
            assert found == pin, f"{path.relative_to(ROOT)} spells {found}, python_env.yaml pins {pin}"
    assert "python_env.yaml" in (ROOT / ".ci" / "run").read_text()  # CI reads the pin, it does not repeat it


def test_extras_add_something_and_the_serving_client_needs_no_extra():
    project = _pyproject()
    runtime = {Requirement(r).name for r in project["dependencies"]}
    for extra, reqs in project.get("optional-dependencies", {}).items():
        assert reqs and not ({Requirement(r).name for r in reqs} & runtime), extra
    assert {"pyarrow", "requests"} <= runtime  # imported by ptycho_ml.lifecycle.serving_client
