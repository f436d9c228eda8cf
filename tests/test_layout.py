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


def test_wheel_holds_only_the_zoo_namespace_and_every_package_folder(tmp_path):
    """setup.py finds the packages (nothing listed by hand): every folder with an __init__.py below zoo/, layers/,
    kernels/ and recipes/ lands in the wheel under zoo/, and nothing else does."""
    import tomllib

    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True, capture_output=True,
    )
    (wheel,) = tmp_path.glob("zoo-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert top == {"zoo", next(t for t in top if t.endswith(".dist-info"))}
    assert "zoo/layers/attention.py" in names
    assert "zoo/recipes/transformer_small.yaml" in names
    package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    for name, folder in package_dir.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            installed = "/".join([*name.split("."), *init.parent.relative_to(ROOT / folder).parts, "__init__.py"])
            assert installed in names, f"{init} is not in the wheel as {installed}"

