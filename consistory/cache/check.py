"""Is an anchor cache whole? Every tensor its codec's schema calls for, with that dtype and shape,
and nothing else.

Only the safetensors header is read (names, dtypes, shapes), so a damaged or foreign cache is
refused with `AnchorCacheError` before any generation starts, instead of failing halfway
through one (or, worse, producing images from the wrong layer).
"""

from __future__ import annotations

from typing import Iterable, Optional

from .layout import LayoutError
from .schema import TensorSpec
from .store import TensorStore


def structure_problem(store: TensorStore, required: list[TensorSpec], allowed: Iterable[str] = ()) -> Optional[str]:
    """None if `store` holds exactly the `required` tensors (plus any of the names `allowed`),
    else the first thing wrong with it."""
    present = set(store)
    names = {spec.name for spec in required}
    missing = sorted(names - present)
    if missing:
        return f"it lacks {len(missing)} tensors, e.g. {missing[0]!r}"
    unknown = sorted(present - names - set(allowed))
    if unknown:
        return f"it holds {len(unknown)} tensors its codec does not make, e.g. {unknown[0]!r}"
    rows: dict[str, int] = {}
    for spec in required:
        try:
            dtype, shape = store.dtype_and_shape(spec.name)
        except LayoutError as error:
            return str(error)
        if not spec.matches(dtype, shape):
            return f"tensor {spec.name!r} is {dtype} {list(shape)}, not {spec.dtype} {list(spec.shape)}"
        if spec.group is not None and rows.setdefault(spec.group, shape[0]) != shape[0]:
            return f"the token rows of {spec.group!r} disagree between its tensors"
    return None
