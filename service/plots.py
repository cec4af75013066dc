"""Attention heatmaps of translation results, drawn with matplotlib.

matplotlib is imported only when a heatmap is drawn, so the client needs nothing beyond the
serving extra unless it draws (the project's `plot` extra).
"""

from __future__ import annotations

from service.client import attention_matrix
from service.proto_gen.nmtserve.v1 import translation_pb2 as pb


def save_attention_png(
    result: pb.TranslationResult,
    path: str,
    *,
    source: str = "",
    layer: int | None = None,
) -> None:
    """Draws `result`'s cross-attention as a heatmap PNG at `path`.

    Source pieces run along x, target pieces along y (the matrix is [target, source]); where the
    piece lists do not match the matrix (pieces not requested), positions are numbered instead.
    Uses the Figure API with no pyplot, so nothing needs a display and no global backend or
    figure registry is touched. Raises ModuleNotFoundError when matplotlib is not installed.
    """
    from matplotlib.figure import Figure

    matrix = attention_matrix(result, layer)
    rows, cols = matrix.shape
    if rows == 0 or cols == 0:
        raise ValueError("the translation has no attention to draw (empty sentence?)")
    xs = list(result.source_pieces) if len(result.source_pieces) == cols else list(range(cols))
    ys = list(result.target_pieces) if len(result.target_pieces) == rows else list(range(rows))

    fig = Figure(figsize=(min(2.0 + 0.45 * cols, 40.0), min(1.8 + 0.4 * rows, 40.0)))
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(cols), [str(x) for x in xs], rotation=60, ha="right")
    ax.set_yticks(range(rows), [str(y) for y in ys])
    ax.set_xlabel("source")
    ax.set_ylabel("target")
    title = source if len(source) <= 80 else source[:77] + "..."
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label="attention")
    fig.savefig(path, dpi=120, bbox_inches="tight")
