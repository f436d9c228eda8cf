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
    assert "zoo/kernels/rwkv7.py" in names  # RWKV-7's name for zoo.kernels.dplr_delta_rule (a module, not a folder)
    package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    for name, folder in package_dir.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            installed = "/".join([*name.split("."), *init.parent.relative_to(ROOT / folder).parts, "__init__.py"])
            assert installed in names, f"{init} is not in the wheel as {installed}"



def run_from_root(*args: str, **kw) -> subprocess.CompletedProcess:
    """``python ARGS`` in a fresh process whose working directory is the repository root (on ``sys.path``, as
    ``python -m`` and pytest put it)."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300, **kw)


def top_level_package_folders() -> list[str]:
    return sorted(p.parent.name for p in ROOT.glob("*/__init__.py"))


def test_no_top_level_package_folder_shadows_an_installed_distribution():
    """Each top-level folder that is a package, imported by its bare name from the repository root, gives an
    installed distribution's module when one provides that name (Hugging Face's ``kernels``, required by
    transformers >= 5.25, beside zoo's ``kernels/``), and the folder otherwise."""
    import importlib.metadata

    provided = importlib.metadata.packages_distributions()
    folders = top_level_package_folders()
    assert {"kernels", "layers", "zoo", "benchmarks"} <= set(folders)
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    print(name, importlib.import_module(name).__file__)"
    result = run_from_root("-c", code, *folders)
    assert result.returncode == 0, result.stderr
    files = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    for name in folders:
        owners = [dist for dist in provided.get(name, []) if dist != "zoo"]
        inside = Path(files[name]).resolve().is_relative_to(ROOT / name)
        assert inside != bool(owners), f"{name}: {files[name]} (installed distributions with that top-level name: {owners})"


def test_readme_commands_run_from_the_repository_root():
    """``import zoo`` imports transformers, which imports Hugging Face's ``kernels`` when it is installed (5.25):
    the README's commands work from the root, where zoo's own ``kernels/`` folder is on ``sys.path``."""
    result = run_from_root("-m", "zoo.train", "recipe=transformer_small", "trainer.max_steps=3", "--print")
    assert result.returncode == 0, result.stderr
    assert "max_steps: 3" in result.stdout
    result = run_from_root("-c", "import benchmarks.kernels, zoo.kernels, kernels; print(kernels.__file__)")
    assert result.returncode == 0, result.stderr
    assert not Path(result.stdout.strip()).resolve().is_relative_to(ROOT / "kernels")


def test_kernels_name_without_the_distribution_is_refused_like_a_missing_module(tmp_path):
    """Where Hugging Face's ``kernels`` is not installed, the bare name is a missing module (what transformers and
    any ``try: import kernels`` expect), and the message says where zoo's folder is importable."""
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r})\ntry:\n    import kernels\nexcept ModuleNotFoundError as e:\n    print(e.name, '|', e)"
    result = run_from_root("-S", "-c", code)  # -S: no site-packages, so no installed `kernels`
    assert result.returncode == 0, result.stderr
    name, message = result.stdout.strip().split(" | ")
    assert name == "kernels" and "importable as zoo.kernels" in message


CAPPED = ["transformers", "lightning", "peft"]  # dependencies whose internals zoo subclasses (README: version policy)


def test_dependencies_zoo_subclasses_are_capped_at_a_tested_minor():
    """Each of ``CAPPED`` has a floor and a cap ``<X.Y`` in pyproject.toml (dependencies or an extra). In CI, which
    installs the newest releases the bounds allow, the installed version is the cap's previous minor: the cap admits
    nothing newer than what this run tests."""
    import importlib.metadata
    import os
    import re
    import tomllib

    from packaging.requirements import Requirement
    from packaging.version import Version

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(r) for r in [*project["dependencies"], *sum(project["optional-dependencies"].values(), [])]]
    for name in CAPPED:
        (req,) = [r for r in requirements if r.name == name]
        caps = [s for s in req.specifier if s.operator == "<"]
        assert [s.operator for s in req.specifier if s.operator == ">="] and len(caps) == 1, f"{name}: {req} needs a floor and one cap"
        assert re.fullmatch(r"\d+\.\d+", caps[0].version), f"{name}: cap {caps[0]} is not a minor version"
        cap = Version(caps[0].version)
        installed = Version(importlib.metadata.version(name))
        assert installed < cap, f"{name} {installed} is outside {req}"
        if os.environ.get("CI"):
            assert (installed.major, installed.minor + 1) == (cap.major, cap.minor), (
                f"{name}: CI installed {installed}, so the cap {caps[0]} admits an untested minor; lower it"
            )


# What each folder may import from zoo: zoo/ stands on layers/ and kernels/, never the reverse; below them only the
# error types and the typed-config checker, which import nothing else of zoo.
ALLOWED_ZOO_IMPORTS = {
    "kernels": ("zoo.errors", "zoo.typed", "zoo.kernels"),
    "layers": ("zoo.errors", "zoo.typed", "zoo.kernels", "zoo.layers"),
    "zoo/errors.py": (),
    "zoo/typed.py": ("zoo.errors",),
}
REPO_PACKAGES = {"zoo", "layers", "kernels", "benchmarks", "tests", "recipes"}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """``(line, absolute module)`` of every import in ``path`` (inside functions too), read with ``ast``; relative
    imports stay inside their own package and are left out."""
    import ast

    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def test_layers_and_kernels_import_from_zoo_only_errors_typed_and_kernels():
    violations = []
    for where, allowed in ALLOWED_ZOO_IMPORTS.items():
        files = [ROOT / where] if where.endswith(".py") else sorted((ROOT / where).rglob("*.py"))
        assert files and all(f.exists() for f in files), where
        for path in files:
            for line, module in imported_modules(path):
                if module.split(".")[0] not in REPO_PACKAGES:
                    continue
                if not any(module == a or module.startswith(a + ".") for a in allowed):
                    violations.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not violations, "imports against the layering (zoo/ -> layers/ -> kernels/):\n" + "\n".join(violations)


def test_the_layering_check_sees_imports_inside_functions(tmp_path):
    source = tmp_path / "block.py"
    source.write_text("import torch\nfrom .ops import x\n\ndef f():\n    from zoo.modeling import ZooModel\n    import zoo.kernels.ssd\n")
    assert imported_modules(source) == [(1, "torch"), (5, "zoo.modeling"), (6, "zoo.kernels.ssd")]
