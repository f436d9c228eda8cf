"""Package discovery for pyproject.toml's package-dir layout: every package below zoo/, layers/, kernels/ and recipes/
is found and installed under the zoo namespace (layers/x -> zoo.layers.x), so nothing is listed by hand."""
import tomllib
from pathlib import Path

from setuptools import find_packages, setup

package_dir = tomllib.loads((Path(__file__).parent / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
packages = [sub for name, folder in package_dir.items() for sub in (name, *(f"{name}.{p}" for p in find_packages(folder)))]
setup(packages=packages)
