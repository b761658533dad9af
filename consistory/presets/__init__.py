"""Offline presets: SDXL-topology pipelines with random weights and a tokenizer built locally, so
that everything runs, and is tested, with no weights and no network.

- `tiny`: seconds on a CPU at 64-128 px; the tests and smoke runs use it.
- `small`: 256 px, where tensor work outweighs Python overhead; CPU benchmarks.
- `full`: SDXL base 1.0's exact architecture, for GPU measurements without a download.

Light on purpose: the builders (`presets.sdxl`) import torch and diffusers, this does not.
"""

PRESETS: tuple[str, ...] = ("tiny", "small", "full")
