"""The `consistory` command line: `generate`, `anchors` and `extend` here, plus the commands
other packages register (`batch`, `eval`)."""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
