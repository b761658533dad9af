"""Errors that mean "the input is wrong", as opposed to a fault while generating.

`InputError` is a ValueError, so callers that catch ValueError keep working; services can tell
a request to fix apart from a server fault by catching it alone.
"""


class InputError(ValueError):
    """The prompts, subjects, seeds, latents or settings given are invalid; the message says how."""
