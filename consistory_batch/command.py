"""The `consistory batch` and `consistory eval` commands, as the command line calls them.

A destination that fails (an unreachable bucket, missing credentials, a full disk) ends the
command with one line saying so (exit status 1), not a traceback.
"""

from __future__ import annotations

import argparse
from typing import Callable


def _store_failures_as_one_line(run: Callable[[argparse.Namespace], int], args: argparse.Namespace,
                                dest: str) -> int:
    from deployments.artifact_store import ArtifactStoreError

    try:
        return run(args)
    except ArtifactStoreError as error:
        raise OSError(f"{dest}: the store failed: {error}") from None


def cmd_batch(args: argparse.Namespace) -> int:
    from .runner import run_batch

    return _store_failures_as_one_line(run_batch, args, args.out)


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import run_eval

    return _store_failures_as_one_line(run_eval, args, args.dest)
