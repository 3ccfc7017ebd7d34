"""An interactive map of an embedding: one self-contained HTML file (Bokeh).

Each protein is a point, coloured by its predominant localization; hovering
shows its gene, protein id, graded localizations and a thumbnail of one of its
crops, and clicking it lists its nearest proteins in the embedding beside the
plot. Frames, when given, are a second tab. The file carries Bokeh's JavaScript
and every image inline, so it opens from disk, offline, in any browser, and can
be mailed or attached to a report as it is.

This module only draws: positions, labels, thumbnails and neighbour lists are
its arguments (`figures.write_embedding_map` computes them from a split).
"""

import base64
import html
import io
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from dlfb_localization.dataset.localizations import LOCALIZATIONS_OF_INTEREST
from dlfb_localization.files import replace_when_written
from dlfb_localization.inspect.embeddings.clustering import (
    LOCALIZATION_COLORS,
    OTHER_COLOR,
)

logger = logging.getLogger(__name__)

__all__ = ["OTHER_LABEL", "thumbnail_uri", "write_interactive_map"]

OTHER_LABEL = "other / none"
PROTEIN_THUMBNAIL = 48  # pixels a side: a crop's pattern, ~2.4 kB as base64
FRAME_THUMBNAIL = 32  # frames are many more; ~1.2 kB each
_EMPTY = "–"

# The one piece of JavaScript: on a click (a selection in either tab), show the
# clicked protein's precomputed neighbour list and ring it (larger) and its
# neighbours.
# `source.data.protein_row` maps a point to its row in `proteins`.
_ON_CLICK = """
const picked = source.selected.indices;
if (picked.length === 0) {
  panel.text = placeholder;
  rings.data = {x: [], y: [], size: []};
  return;
}
const p = source.data.protein_row[picked[0]];
panel.text = proteins.data.neighbours_html[p];
const rows = [p].concat(Array.from(proteins.data.neighbour_rows[p]));
rings.data = {
  x: rows.map((r) => proteins.data.x[r]),
  y: rows.map((r) => proteins.data.y[r]),
  size: rows.map((r, rank) => (rank === 0 ? 24 : 16)),
};
"""


def thumbnail_uri(image: np.ndarray, size: int = PROTEIN_THUMBNAIL) -> str:
    """A grey PNG of `image`, `size` pixels a side, as a `data:` URI.

    Intensities are clipped to [0, 1] (the release's scale, as the model saw
    them) and averaged into `size` x `size` boxes, so a thumbnail's mean
    brightness is the crop's.

    Args:
      image: `[h, w]` one channel of a crop.
      size: side of the thumbnail in pixels.
    """
    from PIL import Image  # matplotlib's and Bokeh's dependency

    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 2:
        raise ValueError(f"a thumbnail needs one [h, w] channel, got {image.shape}")
    grey = np.round(np.clip(np.nan_to_num(image), 0.0, 1.0) * 255).astype(np.uint8)
    picture = Image.fromarray(grey).resize((size, size), Image.Resampling.BOX)
    buffer = io.BytesIO()
    picture.save(buffer, format="png", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _text(values) -> list[str]:
    """Cells as display text, an en dash for an empty one."""
    return [str(v) if str(v) not in ("", "nan") else _EMPTY for v in values]


def _colour_groups(localizations) -> list[str]:
    """The legend group of each predominant localization: one of the chapter's
    nine (which have fixed colours), or `OTHER_LABEL`."""
    return [loc if loc in LOCALIZATION_COLORS else OTHER_LABEL for loc in localizations]


def _point_table(
    xy: np.ndarray, table: pd.DataFrame, thumbnails, thumbnail_size: int
) -> dict[str, list]:
    """The columns every point has: position, labels, colour and thumbnail."""
    xy = np.asarray(xy, dtype=np.float64)
    if xy.shape != (len(table), 2):
        raise ValueError(f"{xy.shape} positions for {len(table)} table rows")
    groups = _colour_groups(table["predominant_localization"].astype(str))
    columns = {
        "x": xy[:, 0].tolist(),
        "y": xy[:, 1].tolist(),
        "name": table["name"].astype(str).tolist(),
        "protein_id": table["protein_id"].astype(np.int64).tolist(),
        "grade1": _text(table["loc_grade1"]),
        "grade2": _text(table["loc_grade2"]),
        "localization": _text(table["predominant_localization"]),
        "group": groups,
        "color": [LOCALIZATION_COLORS.get(g, OTHER_COLOR) for g in groups],
    }
    if thumbnails is not None:
        if len(thumbnails) != len(table):
            raise ValueError(
                f"{len(thumbnails)} thumbnails for {len(table)} table rows"
            )
        columns["thumbnail"] = [thumbnail_uri(t, thumbnail_size) for t in thumbnails]
    return columns


def _tooltip(with_thumbnail: bool, frame: bool) -> str:
    """Hover HTML; Bokeh escapes every `@field` (no `{safe}` is used)."""
    image = (
        '<img src="@thumbnail" width="96" height="96" '
        'style="display:block;margin-bottom:4px">'
        if with_thumbnail
        else ""
    )
    frame_line = "<div>frame @frame_id</div>" if frame else ""
    return (
        f'<div style="max-width:240px">{image}'
        "<div><b>@name</b> (protein @protein_id)</div>"
        f"{frame_line}"
        "<div>grade 1: @grade1</div>"
        "<div>grade 2: @grade2</div>"
        "</div>"
    )


def _neighbour_html(
    columns: dict[str, list],
    neighbours: np.ndarray,
    distances: np.ndarray | None,
    note: str,
) -> list[str]:
    """Per protein: its name and its neighbours as an ordered list (escaped)."""
    e = html.escape
    lists = []
    for row, found in enumerate(neighbours):
        items = []
        for rank, other in enumerate(found):
            distance = "" if distances is None else f" · {distances[row, rank]:.3f}"
            items.append(
                f"<li><b>{e(columns['name'][other])}</b> "
                f"({e(columns['localization'][other])}){distance}</li>"
            )
        lists.append(
            f"<p><b>{e(columns['name'][row])}</b> (protein "
            f"{columns['protein_id'][row]}; grade 1: {e(columns['grade1'][row])}; "
            f"grade 2: {e(columns['grade2'][row])})</p>"
            f"<p>{len(found)} nearest proteins{e(note)}:</p>"
            f"<ol>{''.join(items)}</ol>"
        )
    return lists


def _scatter(title: str, source, columns, tooltip: str, size: float):
    """A square scatter plot of `source`, legend by colour group, with hover
    and tap tools; returns `(figure, renderer)`."""
    from bokeh.models import HoverTool, Legend, LegendItem, TapTool
    from bokeh.plotting import figure

    plot = figure(
        title=title,
        width=780,
        height=600,
        tools="pan,wheel_zoom,box_zoom,reset,save",
        active_scroll="wheel_zoom",
        x_axis_label="UMAP 1",
        y_axis_label="UMAP 2",
    )
    plot.xaxis.major_label_text_font_size = "0pt"
    plot.yaxis.major_label_text_font_size = "0pt"
    points = plot.scatter(
        "x",
        "y",
        source=source,
        size=size,
        fill_color="color",
        line_color="color",
        fill_alpha=0.8,
        nonselection_fill_alpha=0.15,
        nonselection_line_alpha=0.15,
        selection_line_color="black",
    )
    plot.add_tools(HoverTool(renderers=[points], tooltips=tooltip), TapTool())
    first = {}
    for index, group in enumerate(columns["group"]):
        first.setdefault(group, index)
    order = [g for g in (*LOCALIZATIONS_OF_INTEREST, OTHER_LABEL) if g in first]
    legend = Legend(
        items=[
            LegendItem(label=group, renderers=[points], index=first[group])
            for group in order
        ],
        title="predominant localization",
        click_policy="none",
    )
    plot.add_layout(legend, "right")
    return plot, points


def write_interactive_map(
    path: str | os.PathLike,
    *,
    protein_xy: np.ndarray,
    protein_table: pd.DataFrame,
    neighbours: np.ndarray,
    neighbour_distances: np.ndarray | None = None,
    thumbnails: np.ndarray | None = None,
    frame_xy: np.ndarray | None = None,
    frame_table: pd.DataFrame | None = None,
    frame_thumbnails: np.ndarray | None = None,
    title: str = "Embedding map",
    note: str = "",
    neighbour_note: str = "",
) -> Path:
    """Writes the interactive map of proteins (and frames) as one HTML file.

    The file holds Bokeh's JavaScript and CSS inline (no network needed) and
    is written through `files.replace_when_written`. Positions are drawn as
    they are; protein and frame positions should share one plane (e.g. each
    protein at the centre of its frames), as clicking a frame rings its
    protein's neighbours at their protein positions in both tabs.

    Args:
      path: the `.html` file to write.
      protein_xy: `[p, 2]` position of each protein.
      protein_table: `p` rows with `protein_id`, `name`, `loc_grade1`,
        `loc_grade2` and `predominant_localization` (as
        `embeddings.label_tables` gives them).
      neighbours: `[p, k]` rows of `protein_table`: each protein's nearest
        proteins, nearest first (not itself).
      neighbour_distances: `[p, k]` their distances, listed beside them.
      thumbnails: `[p, h, w]` one crop's channel per protein (see
        `thumbnail_uri`); no images in the hover without them.
      frame_xy: `[n, 2]` position of each frame, for a second tab.
      frame_table: `n` rows with `frame_id` and the protein table's columns;
        every `protein_id` must be in `protein_table`.
      frame_thumbnails: `[n, h, w]`, smaller thumbnails for the frames' hover.
      title: the page's heading and `<title>`.
      note: a sentence under the heading: what the positions and colours are.
      neighbour_note: what the neighbours' distance is, e.g. " by Hellinger
        distance of mean codebook histograms" (shown after "k nearest
        proteins").

    Returns:
      `path`.
    """
    from bokeh.embed import file_html
    from bokeh.layouts import column, row
    from bokeh.models import ColumnDataSource, CustomJS, Div, TabPanel, Tabs
    from bokeh.resources import INLINE

    protein_table = protein_table.reset_index(drop=True)
    neighbours = np.asarray(neighbours, dtype=np.int64)
    if neighbours.ndim != 2 or len(neighbours) != len(protein_table):
        raise ValueError(
            f"neighbours must be [{len(protein_table)}, k], got {neighbours.shape}"
        )
    if neighbours.size and not (
        neighbours.min() >= 0 and neighbours.max() < len(protein_table)
    ):
        raise ValueError("neighbours must be rows of protein_table")
    if neighbour_distances is not None:
        neighbour_distances = np.asarray(neighbour_distances, dtype=np.float64)
        if neighbour_distances.shape != neighbours.shape:
            raise ValueError("neighbour_distances must have the shape of neighbours")
    if (frame_xy is None) != (frame_table is None):
        raise ValueError("give frame_xy and frame_table together")

    columns = _point_table(protein_xy, protein_table, thumbnails, PROTEIN_THUMBNAIL)
    columns["protein_row"] = list(range(len(protein_table)))
    columns["neighbour_rows"] = neighbours.tolist()
    columns["neighbours_html"] = _neighbour_html(
        columns, neighbours, neighbour_distances, neighbour_note
    )
    proteins = ColumnDataSource(columns, name="proteins")
    rings = ColumnDataSource({"x": [], "y": [], "size": []}, name="neighbour_rings")
    placeholder = (
        "<p><i>Click a protein (or a frame) to list its nearest proteins in the "
        "embedding; click empty space to clear.</i></p>"
    )
    panel = Div(text=placeholder, width=330, name="neighbours")

    def ring(plot) -> None:
        plot.scatter(
            "x",
            "y",
            source=rings,
            size="size",
            fill_alpha=0,
            line_color="black",
            line_width=2,
        )

    plot, _ = _scatter(
        f"{len(protein_table)} proteins",
        proteins,
        columns,
        _tooltip(thumbnails is not None, frame=False),
        size=9,
    )
    ring(plot)
    tabs = [TabPanel(child=plot, title="proteins")]
    sources = [proteins]

    if frame_table is not None:
        frame_table = frame_table.reset_index(drop=True)
        frame_columns = _point_table(
            frame_xy, frame_table, frame_thumbnails, FRAME_THUMBNAIL
        )
        frame_columns["frame_id"] = frame_table["frame_id"].astype(np.int64).tolist()
        row_of = {p: i for i, p in enumerate(columns["protein_id"])}
        unknown = set(frame_columns["protein_id"]) - set(row_of)
        if unknown:
            raise ValueError(
                f"frames of protein id(s) {sorted(unknown)[:5]} not in protein_table"
            )
        frame_columns["protein_row"] = [row_of[p] for p in frame_columns["protein_id"]]
        frames = ColumnDataSource(frame_columns, name="frames")
        frame_plot, _ = _scatter(
            f"{len(frame_table)} frames",
            frames,
            frame_columns,
            _tooltip(frame_thumbnails is not None, frame=True),
            size=5,
        )
        ring(frame_plot)
        tabs.append(TabPanel(child=frame_plot, title="frames"))
        sources.append(frames)

    for source in sources:
        source.selected.js_on_change(
            "indices",
            CustomJS(
                args={
                    "source": source,
                    "proteins": proteins,
                    "panel": panel,
                    "rings": rings,
                    "placeholder": placeholder,
                },
                code=_ON_CLICK,
            ),
        )
    heading = Div(
        text=f"<h2 style='margin:0'>{html.escape(title)}</h2>"
        f"<p style='max-width:1000px'>{html.escape(note)}</p>",
        name="heading",
    )
    layout = column(heading, row(Tabs(tabs=tabs), panel))
    page = file_html(layout, resources=INLINE, title=title)
    path = Path(path)
    with replace_when_written(path) as tmp:
        tmp.write_bytes(page.encode("utf-8"))
    logger.info("wrote %s (%.1f MB)", path, path.stat().st_size / 1e6)
    return path
