"""The design card's folders install as qwen2q.* subpackages, never as top-level names; the research and
developer tools (dev/ in the repository) are not installed at all."""
import configparser
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import REPO

SUBPACKAGES = ["quantizers", "kernels", "calibrate", "evals"]
# What used to ship in qwen2q.evals and now lives in dev/qwen2q_dev: never in the wheel, never importable from it.
DEV_MODULES = ["compare_peers", "paired", "train_tiny", "random_checkpoint", "bench_kernels", "autoawq_layer0"]
PROBE = (
    "import importlib.util, json\n"
    "print(json.dumps({n: importlib.util.find_spec('qwen2q.' + n).origin for n in %r}))\n"
    "spec = importlib.util.find_spec('kernels')\n"
    "print(json.dumps(spec.origin if spec else None))\n" % SUBPACKAGES
)


def _probe(env=None):
    r = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd="/", env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    import json

    found, top_level = (json.loads(line) for line in r.stdout.splitlines())
    return found, top_level


def test_installed_package_maps_folders_to_subpackages():
    found, top_level = _probe()
    for name in SUBPACKAGES:
        assert Path(found[name]).parent.name == name
    assert top_level is None or not Path(top_level).is_relative_to(REPO)


def test_setup_cfg_packages_only_the_product():
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    packages = cfg["options"]["packages"].split()
    assert packages == ["qwen2q"] + [f"qwen2q.{name}" for name in SUBPACKAGES]
    folders = [line.split("=")[1].strip() for line in cfg["options"]["package_dir"].strip().splitlines()]
    assert not any(f == "dev" or f.startswith("dev/") for f in folders)


def test_dev_modules_are_not_importable_from_the_package():
    probe = ("import importlib.util, json\n"
             f"print(json.dumps([n for n in {DEV_MODULES!r} if importlib.util.find_spec('qwen2q.evals.' + n)]))\n"
             "print(json.dumps(importlib.util.find_spec('qwen2q_dev') is not None))\n")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd="/", timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["[]", "false"]


BUILD_LEFTOVERS = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """qwen2q's wheel, built by `pip wheel` from a copy of this checkout without its build outputs (about 10 s):
    setuptools packs whatever an old build/lib still holds, e.g. modules since moved out of the package."""
    tmp = tmp_path_factory.mktemp("wheel")
    source, out = tmp / "source", tmp / "out"
    shutil.copytree(REPO, source, ignore=BUILD_LEFTOVERS)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(out), str(source)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return next(out.glob("qwen2q-*.whl"))


def test_wheel_holds_the_product_and_no_research_or_dev_code(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    code = [n for n in names if ".dist-info/" not in n]
    assert code and all(n.startswith("qwen2q/") for n in code), [n for n in code if not n.startswith("qwen2q/")]
    stems = {Path(n).stem for n in code if n.endswith(".py")}
    assert not stems & set(DEV_MODULES)
    assert not any(part in ("results", "peers", "dev", "qwen2q_dev") for n in code for part in Path(n).parts)
    assert not any(n.endswith((".json", ".sh")) and not n.startswith("qwen2q/assets/") for n in code)
    for module in ("perplexity", "drift", "harness", "demo", "data", "table"):
        assert f"qwen2q/evals/{module}.py" in names


@pytest.mark.slow
def test_built_wheel_has_subpackages_and_no_top_level_folders(tmp_path, wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for name in SUBPACKAGES:
        assert f"qwen2q/{name}/__init__.py" in names
        assert not any(n.startswith(f"{name}/") for n in names)
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    found, top_level = _probe(env={**os.environ, "PYTHONPATH": str(target)})
    for name in SUBPACKAGES:
        assert Path(found[name]).is_relative_to(target)
    assert top_level is None or not Path(top_level).is_relative_to(target)
