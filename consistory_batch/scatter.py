"""The paper's main figure for one batch: subject consistency against prompt alignment, a point
per story and the batch's mean."""

from __future__ import annotations

import io
from typing import Any


def scatter_png(report: dict[str, Any]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    from matplotlib.figure import Figure

    points = [(s["alignment"], s["consistency"]) for s in report["stories"] if s["consistency"] is not None]
    overall = report["overall"]
    figure = Figure(figsize=(5.5, 4.5), dpi=120)
    axes = figure.add_subplot()
    if points:
        xs, ys = zip(*points)
        axes.scatter(xs, ys, s=14, alpha=0.6, color="tab:blue", label=f"stories ({len(points)})")
    if overall["consistency"] is not None:
        axes.scatter([overall["alignment"]], [overall["consistency"]], s=120, marker="*", color="tab:red",
                     label="mean", zorder=3)
    axes.set_xlabel(f"prompt alignment (CLIP image-text cosine, {report['clip']})")
    axes.set_ylabel(f"subject consistency ({report['consistency_metric']})")
    axes.set_title(f"{overall['stories']} stories, {overall['images']} images", fontsize=10)
    axes.grid(True, alpha=0.3)
    axes.legend(loc="best", fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
