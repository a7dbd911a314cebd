"""Installed, not checked out: the wheel carries its configs and data, and every console script works
from an empty folder outside the source tree."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from .conftest import ROOT

SCRIPTS = ["train", "eval", "export", "score", "serve", "report"]
TINY_RUN = ["trainer.max_steps=5", "trainer.limit_val_batches=2", "trainer.limit_test_batches=2", "logger=none"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding only the built wheel of rewardlab; its dependencies are this venv's,
    reached through a .pth file (which does not run this checkout's editable-install hook)."""
    tmp = tmp_path_factory.mktemp("wheel")
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp / "dist", ROOT], check=True)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", tmp / "venv"], check=True)
    python = tmp / "venv" / "bin" / "python"
    wheel = next((tmp / "dist").glob("rewardlab-*.whl"))
    subprocess.run([*pip, "--python", python, "install", "-q", "--no-deps", wheel], check=True)
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], check=True, capture_output=True
    )
    Path(site.stdout.decode().strip(), "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return tmp / "venv" / "bin"


def run(bin_dir: Path, script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [bin_dir / f"rewardlab-{script}", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
def test_the_wheel_works_from_an_empty_folder(installed, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    where = run(installed, "train", "--cfg", "job", "--resolve", "--package", "data", cwd=empty)
    assert where.returncode == 0 and str(installed.parent / "lib") in where.stdout  # data from the wheel
    assert str(ROOT) not in where.stdout
    with ThreadPoolExecutor(len(SCRIPTS)) as pool:
        helps = dict(zip(SCRIPTS, pool.map(lambda script: run(installed, script, "--help", cwd=empty), SCRIPTS)))
    for script, done in helps.items():
        assert done.returncode == 0, f"{script}: {done.stderr[-2000:]}"
        assert f"rewardlab-{script}" in done.stdout or script == "report"
    done = run(installed, "train", *TINY_RUN, "~callbacks.progress_bar", cwd=empty)
    assert done.returncode == 0, done.stderr[-3000:]
    (results,) = list(empty.glob("outputs/train/runs/*/results.json"))
    assert json.loads(results.read_text())["global_step"] == 5


@pytest.mark.slow
def test_a_config_folder_of_your_own_extends_the_packaged_one(installed, tmp_path):
    mine = tmp_path / "myconf"
    (mine / "data").mkdir(parents=True)
    quiz = ROOT / "rewardlab" / "assets" / "quiz"
    (mine / "data" / "mine.yaml").write_text(
        f"defaults:\n  - default\ntrain_file: {quiz}/val.jsonl\nval_file: {quiz}/test.jsonl\nbatch_size: 8\n"
    )
    done = run(installed, "train", f"--config-dir={mine}", "data=mine", *TINY_RUN, "hydra.run.dir=run", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "results.json").read_text())["data/train/read"] == 500


def test_every_third_party_import_is_a_declared_dependency():
    """What rewardlab imports, a `pip install rewardlab` installs: each top-level module its code imports
    comes from a distribution named in pyproject's dependencies (one pulled in by another is not enough)."""
    import ast
    import importlib.metadata
    import re

    import tomllib

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]

    def canonical(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    names = {canonical(re.split(r"[<>=!~\[; ]", d, maxsplit=1)[0]) for d in declared}
    modules = set()
    for path in (ROOT / "rewardlab").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    modules -= set(sys.stdlib_module_names) | {"rewardlab", "__future__"}
    providers = importlib.metadata.packages_distributions()
    undeclared = {m: providers.get(m) for m in modules if not {canonical(d) for d in providers.get(m, [m])} & names}
    assert not undeclared, f"imported but not in pyproject's dependencies: {undeclared}"
