"""`pip install .` (not only editable) must ship models/ and guides/ as pyro_vae.models / pyro_vae.guides."""
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(out), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    (whl,) = out.glob("pyro_vae-*.whl")
    return whl


def test_wheel_maps_models_and_guides_into_the_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for path in ("pyro_vae/cli/__init__.py", "pyro_vae/estimators/dreg.py", "pyro_vae/models/bernoulli_vae.py",
                 "pyro_vae/guides/diagonal_normal.py", "pyro_vae/py.typed",
                 *(f"pyro_vae/{sub}/__init__.py" for sub in ("analysis", "data", "nets", "plots", "programs", "training"))):
        assert path in names, path
    assert not any(n.startswith(("models/", "guides/", "tests/")) for n in names), "stray top-level packages"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "pyro-vae = pyro_vae.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_installed_wheel_works_outside_the_repo(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, timeout=600)
    code = ("import pyro_vae, pyro_vae.models as m, pyro_vae.guides as g; "
            "print(pyro_vae.__file__, m.__file__, sorted(m.MODELS), sorted(g.GUIDES))")
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert str(target) in res.stdout and "'vae'" in res.stdout and "'diagonal-normal'" in res.stdout


def test_models_folder_is_not_importable_under_a_second_name():
    res = subprocess.run([sys.executable, "-c", "import models"], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode != 0 and "import this package as pyro_vae.models" in res.stderr
