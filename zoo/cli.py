"""The one convention of zoo's command-line entry points (``zoo.train``, ``zoo.ablate``, ``zoo.generate``,
``zoo.convert``, ``zoo.merge``, ``zoo.eval``): arguments parsed by :class:`ArgumentParser`; a usage error or any
:class:`~zoo.errors.ZooError` prints ``PROG: error: MESSAGE`` on stderr and exits with code 2; ``-h`` prints help.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, NoReturn

from zoo.errors import ZooError


class _Exit(Exception):
    """argparse asked to exit (``-h``): return this status from :func:`run_main` instead of raising SystemExit."""

    def __init__(self, status: int):
        super().__init__(status)
        self.status = status


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are ZooErrors (so they take the one error path) and whose ``-h`` returns."""

    def error(self, message: str) -> NoReturn:
        raise ZooError(f"{message}\n{self.format_usage().strip()}")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            print(message, file=sys.stderr, end="")
        raise _Exit(status)


def run_main(prog: str, body: Callable[[], int | None]) -> int:
    """Run an entry point's ``body``; its exit code (0 for None), or 2 after printing a ZooError as ``PROG: error: ...``."""
    try:
        return body() or 0
    except _Exit as done:
        return done.status
    except ZooError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2


def run_parsed(prog: str, parser: ArgumentParser, argv: list[str] | None, action: Callable[[argparse.Namespace], None]) -> int:
    """Parse ``argv`` (None: the command line) with ``parser`` and run ``action(args)``, both under :func:`run_main`."""
    return run_main(prog, lambda: action(parser.parse_args(sys.argv[1:] if argv is None else argv)))


def split_recipe_args(settings: list[str], usage: str) -> tuple[str, list[str]]:
    """``["recipe=NAME", "a.b=1", ...]`` -> ``("NAME", ["a.b=1", ...])``: the recipe-style arguments of train and ablate."""
    recipes = [s.split("=", 1)[1] for s in settings if s.startswith("recipe=")]
    if not recipes or not recipes[-1]:
        raise ZooError(f"no recipe given\n{usage}")
    return recipes[-1], [s for s in settings if not s.startswith("recipe=")]
