"""Pictures of a clustering: a 2-D map of documents and centroids, and a table of clusters.

A person decides whether the keep rule did the right thing (the blog's authors inspected their
145 clusters by eye), and for that a map plus a sortable list of size, label, score and verdict
is what helps. The map is a PCA projection: cheap, deterministic, and good enough to see which
clusters sit apart. The html page is interactive with plotly when it is installed and a static
page (the map as SVG plus the table) otherwise.
"""

from __future__ import annotations

import html
import importlib.util
import io
from collections.abc import Sequence
from typing import Any

import numpy as np

MAX_ANNOTATED = 40
DROPPED_COLOR = "#b0b0b0"


def project_2d(points: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """PCA to two dimensions along the directions in which the centroids differ most.

    Axes fitted on the centroids show how clusters sit relative to each other (the point of
    the map); axes fitted on all documents would mostly show spread inside clusters. With fewer
    than three centroids there is no plane to fit, so the documents choose the axes.
    """
    both = np.concatenate([centroids, points]).astype(np.float64)
    if len(both) == 0:
        return np.zeros((0, 2)), np.zeros((0, 2))
    basis = both[: len(centroids)] if len(centroids) >= 3 else both
    mean = basis.mean(axis=0)
    _, _, components = np.linalg.svd(basis - mean, full_matrices=False)
    axes = components[:2]
    # SVD may flip an axis between runs on different BLAS builds; pin each to a positive sum.
    axes = axes * np.where(axes.sum(axis=1, keepdims=True) < 0, -1.0, 1.0)
    projected = (both - mean) @ axes.T
    if projected.shape[1] < 2:
        projected = np.pad(projected, ((0, 0), (0, 2 - projected.shape[1])))
    return projected[len(centroids) :], projected[: len(centroids)]


def cluster_centres(points: np.ndarray, clusters: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Where to draw each cluster: the middle of its shown points, else its projected centroid.

    A centroid of unit vectors is longer than its members once normalized, so its projection
    lands outside its own cloud; the members' mean is where a reader looks for it.
    """
    placed = np.array(centres, dtype=np.float64, copy=True)
    for cluster in np.unique(clusters):
        placed[cluster] = points[clusters == cluster].mean(axis=0)
    return placed


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """Clusters by size, largest first, with label, score and the keep verdict."""
    ordered = sorted(rows, key=lambda row: (-row["size"], row["cluster_id"]))
    total = sum(row["size"] for row in rows) or 1
    kept = [row for row in rows if row["kept"]]
    lines = [
        f"{len(kept)} of {len(rows)} clusters kept, "
        f"{sum(row['size'] for row in kept)} of {sum(row['size'] for row in rows)} documents.",
        "",
        "| cluster | size | share | label | score | kept | reason |",
        "|---:|---:|---:|---|---:|:---:|---|",
    ]
    for row in ordered:
        lines.append(
            f"| {row['cluster_id']} | {row['size']} | {100 * row['size'] / total:.1f}% "
            f"| {_cell(row['label'])} | {_cell(row['score'])} | {'yes' if row['kept'] else 'no'} "
            f"| {_cell(row['reason'])} |"
        )
    return "\n".join(lines) + "\n"


def _colors(count: int) -> list[Any]:
    from matplotlib import colormaps

    palette = colormaps["tab20"]
    return [palette(i % 20) for i in range(count)]


def _figure(
    points: np.ndarray, clusters: np.ndarray, centres: np.ndarray, rows: Sequence[dict[str, Any]]
) -> Any:
    from matplotlib.figure import Figure  # no pyplot: no global state, safe off the main thread

    by_id = {row["cluster_id"]: row for row in rows}
    colors = _colors(len(centres))
    kept = np.array([bool(by_id.get(c, {}).get("kept", True)) for c in range(len(centres))], dtype=bool)
    figure = Figure(figsize=(11, 8), dpi=100)
    axes = figure.add_subplot()
    if len(points):
        point_colors = [colors[c] if kept[c] else DROPPED_COLOR for c in clusters]
        dot = 4 if len(points) > 2000 else 14
        axes.scatter(points[:, 0], points[:, 1], s=dot, c=point_colors, alpha=0.6, linewidths=0)
    centres = cluster_centres(points, clusters, centres)
    sizes = np.array([by_id.get(c, {}).get("size", 0) for c in range(len(centres))], dtype=float)
    marker = 20 + 300 * np.sqrt(sizes / max(sizes.max(), 1.0))
    axes.scatter(
        centres[:, 0],
        centres[:, 1],
        s=marker,
        c=[colors[c] if kept[c] else DROPPED_COLOR for c in range(len(centres))],
        edgecolors="black",
        linewidths=0.6,
    )
    for cluster in np.argsort(-sizes)[:MAX_ANNOTATED]:
        row = by_id.get(int(cluster), {})
        text = row.get("label") or f"#{cluster}"
        axes.annotate(
            text if len(text) <= 30 else text[:29] + "…",
            (centres[cluster, 0], centres[cluster, 1]),
            fontsize=7,
            color="black" if kept[cluster] else "#888888",
            xytext=(3, 3),
            textcoords="offset points",
        )
    axes.set_title(f"{len(centres)} clusters ({int(kept.sum())} kept; grey = dropped), PCA of embeddings")
    axes.set_xticks([])
    axes.set_yticks([])
    figure.tight_layout()
    return figure


def cluster_map_png(
    points: np.ndarray, clusters: np.ndarray, centres: np.ndarray, rows: Sequence[dict[str, Any]]
) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    figure = _figure(points, clusters, centres, rows)
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def cluster_map_html(
    points: np.ndarray, clusters: np.ndarray, centres: np.ndarray, rows: Sequence[dict[str, Any]]
) -> str:
    if importlib.util.find_spec("plotly") is not None:
        return _plotly_html(points, clusters, centres, rows)
    from matplotlib.backends.backend_svg import FigureCanvasSVG

    figure = _figure(points, clusters, centres, rows)
    FigureCanvasSVG(figure)
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg")
    svg = buffer.getvalue()
    svg = svg[svg.find("<svg") :]
    return _page(svg, rows)


def _page(body: str, rows: Sequence[dict[str, Any]]) -> str:
    header = "<tr><th>cluster</th><th>size</th><th>label</th><th>score</th><th>kept</th><th>reason</th></tr>"
    lines = [
        "<tr>"
        + "".join(
            f"<td>{html.escape(_cell(row[key]))}</td>"
            for key in ("cluster_id", "size", "label", "score", "kept", "reason")
        )
        + "</tr>"
        for row in sorted(rows, key=lambda row: (-row["size"], row["cluster_id"]))
    ]
    return (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>cosmoforge clusters</title>"
        "<style>body{font-family:sans-serif}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px}</style></head><body>\n"
        f"{body}\n<table>{header}{''.join(lines)}</table>\n</body></html>\n"
    )


def _plotly_html(
    points: np.ndarray, clusters: np.ndarray, centres: np.ndarray, rows: Sequence[dict[str, Any]]
) -> str:
    import plotly.graph_objects as go  # only when installed; not a dependency

    by_id = {row["cluster_id"]: row for row in rows}
    names = [by_id.get(int(c), {}).get("label") or f"#{int(c)}" for c in clusters]
    figure = go.Figure()
    figure.add_scattergl(
        x=points[:, 0], y=points[:, 1], mode="markers", marker={"size": 3, "color": clusters}, text=names
    )
    figure.add_scatter(
        x=centres[:, 0],
        y=centres[:, 1],
        mode="markers+text",
        text=[by_id.get(c, {}).get("label") or f"#{c}" for c in range(len(centres))],
        marker={"size": 10, "symbol": "diamond"},
    )
    figure.update_layout(showlegend=False, title="clusters (PCA of embeddings)")
    return _page(figure.to_html(full_html=False, include_plotlyjs=True), rows)
