"""The `consistory batch` and `consistory eval` commands, as the command line calls them."""

from __future__ import annotations

import argparse


def cmd_batch(args: argparse.Namespace) -> int:
    from .runner import run_batch

    return run_batch(args)


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import run_eval

    return run_eval(args)
