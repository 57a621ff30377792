"""The design card's folders install as qwen2q.* subpackages, never as top-level names."""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import REPO

SUBPACKAGES = ["quantizers", "kernels", "calibrate", "evals"]
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


@pytest.mark.slow
def test_built_wheel_has_subpackages_and_no_top_level_folders(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    wheel = next(tmp_path.glob("qwen2q-*.whl"))
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
