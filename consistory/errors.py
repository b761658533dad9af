"""Errors that mean "the input is wrong", as opposed to a fault while generating.

`InputError` is a ValueError, so callers that catch ValueError keep working; services can tell
a request to fix apart from a server fault by catching it alone.
"""


class InputError(ValueError):
    """The prompts, subjects, seeds, latents or settings given are invalid; the message says how."""


class UsageError(Exception):
    """The command line is wrong in a way argparse cannot see; the message says what to fix."""
