"""The package installs as one namespace: zoo, zoo.layers, zoo.kernels, zoo.recipes; nothing else."""
import subprocess
import sys
import zipfile
from pathlib import Path

import zoo.kernels
import zoo.layers

ROOT = Path(__file__).resolve().parents[1]


def test_subpackages_come_from_the_repo_folders():
    assert Path(zoo.layers.__file__).resolve().parent == ROOT / "layers"
    assert Path(zoo.kernels.__file__).resolve().parent == ROOT / "kernels"


def test_wheel_holds_only_the_zoo_namespace(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True, capture_output=True,
    )
    (wheel,) = tmp_path.glob("zoo-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert top == {"zoo", next(t for t in top if t.endswith(".dist-info"))}
    assert "zoo/layers/attention.py" in names
    assert "zoo/kernels/__init__.py" in names
    assert "zoo/recipes/transformer_small.yaml" in names


def test_every_package_folder_is_listed_in_pyproject():
    import tomllib

    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setup["packages"])
    for name, folder in setup["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            dotted = ".".join([name, *rel.parts])
            assert dotted in listed, f"{init.parent} is a package but {dotted} is not in pyproject's packages"
