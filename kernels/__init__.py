"""zoo.kernels: scan kernels, one folder per op (``naive.py`` reference, Triton implementation, public function).

This folder installs as ``zoo.kernels``. When the repository root is on ``sys.path`` (``python -m zoo.train`` or
``pytest`` run from the root), Python also finds it under the top-level name ``kernels``, which belongs to Hugging
Face's ``kernels`` distribution (a requirement of transformers >= 5.25, which imports it). Imported under that name,
this module hands the name over: it loads the installed distribution with the root left out of the search and
leaves that in ``sys.modules``, so ``import kernels`` gives Hugging Face's package in every process, whatever the
working directory and however zoo was installed (editable or wheel). Without that distribution the name is refused
the way a missing module is.
"""
if __name__ == "kernels":
    import importlib
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _saved_path = list(sys.path)
    sys.path[:] = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != _root]
    del sys.modules["kernels"]  # this module, so that the import below searches again
    try:
        importlib.import_module("kernels")
    except ModuleNotFoundError as err:
        if err.name != "kernels":
            raise
        raise ModuleNotFoundError(
            f"No module named 'kernels' (the folder {os.path.join(_root, 'kernels')} is zoo's, importable as zoo.kernels; "
            "the top-level name belongs to Hugging Face's `kernels` distribution, which is not installed)",
            name="kernels",
        ) from None
    finally:
        sys.path[:] = _saved_path
