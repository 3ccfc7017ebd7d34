"""The interactive map (`map.html`): one self-contained page holding every
protein with its labels, a thumbnail and its nearest proteins in the embedding.

The embeddings and the 2-D positions here are seeded random numbers, not a
model's or UMAP's: what is tested is what the map shows of given numbers, and
no UMAP (tens of seconds of numba compilation) is run."""

import base64
import html
import io
import json
import re

import numpy as np
import pandas as pd
import pytest
from bokeh.document import Document
from PIL import Image

from dlfb_localization.dataset.builder import DatasetBuilder
from dlfb_localization.figures import write_embedding_map, write_model_figures
from dlfb_localization.inspect.interactive import OTHER_LABEL, write_interactive_map
from dlfb_localization.projection import Projection

K = 3
PNG_URI = "data:image/png;base64,"


@pytest.fixture(scope="module")
def split(module_tiny_release, tmp_path_factory):
    """The tiny release (6 proteins, 72 frames of 16x16) as one split; the cache
    is kept outside the shared release folder."""
    path, _, _ = module_tiny_release
    cache = tmp_path_factory.mktemp("map_cache")
    return DatasetBuilder(path, cache_dir=cache).build(rng=0, splits={"all": 1.0})[
        "all"
    ]


def _inputs(split, seed=0):
    """Seeded histograms and positions of the split's frames, in a shuffled
    frame order (the map must not rely on frame-id order)."""
    rng = np.random.default_rng(seed)
    frame_ids = rng.permutation(split.labels.frame_ids)
    embeddings = {
        "frame_ids": frame_ids,
        "frame_histograms": rng.integers(0, 12, (len(frame_ids), 16)).astype(np.int32),
    }
    projection = Projection(
        frame_ids, rng.normal(size=(len(frame_ids), 2)).astype(np.float32)
    )
    return embeddings, projection


def _sources(page: str) -> dict[str, dict]:
    """The data of the page's named ColumnDataSources, read back by Bokeh."""
    found = re.search(
        r'<script type="application/json"[^>]*>(.*?)</script>', page, re.S
    )
    assert found, "no Bokeh document in the page"
    # Bokeh escapes the JSON as HTML text, and unescapes it in the browser.
    (doc_json,) = json.loads(html.unescape(found.group(1))).values()
    document = Document.from_json(doc_json)
    return {
        name: {key: list(values) for key, values in source.data.items()}
        for name in ("proteins", "frames")
        if (source := document.select_one({"name": name})) is not None
    }


def _independent_knn(split, embeddings, k):
    """Protein id -> its k nearest protein ids by the Hellinger distance of the
    proteins' mean histograms, computed without the library: pandas means,
    a square root and all pairwise distances."""
    lookup = split.labels.lookup.set_index("frame_id")
    proteins = lookup.loc[embeddings["frame_ids"], "protein_id"].to_numpy()
    means = (
        pd.DataFrame(embeddings["frame_histograms"].astype(float))
        .groupby(proteins)
        .mean()
    )
    roots = np.sqrt(means.to_numpy() / means.to_numpy().sum(axis=1, keepdims=True))
    # Hellinger: the square roots' Euclidean distance over sqrt 2.
    distances = np.linalg.norm(roots[:, None] - roots[None], axis=-1) / np.sqrt(2)
    np.fill_diagonal(distances, np.inf)
    order = np.argsort(distances, axis=1, kind="stable")[:, :k]
    ids = means.index.to_numpy()
    return {
        int(ids[i]): (ids[order[i]].tolist(), distances[i, order[i]])
        for i in range(len(ids))
    }


def test_the_map_is_one_offline_page_with_every_protein(split, tmp_path):
    embeddings, projection = _inputs(split)
    path = write_embedding_map(
        tmp_path / "map.html", split, embeddings, projection, title="tiny", k=K
    )

    page = path.read_text(encoding="utf-8")
    # Self-contained: no script, style sheet or image is fetched from anywhere.
    assert page.startswith("<!DOCTYPE html>")
    assert not re.search(r"<script[^>]+src=", page)
    assert not re.search(r"<link[^>]+href=", page)
    assert "Bokeh" in page and len(page) > 500_000  # BokehJS itself is inline
    # 6 proteins and 72 frames with their thumbnails: BokehJS (~1.7 MB) and
    # ~200 kB of data; far under the 10 MB a page should stay under.
    assert path.stat().st_size < 3_000_000
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind

    data = _sources(page)
    proteins, frames = data["proteins"], data["frames"]
    labels = split.labels.lookup.drop_duplicates("protein_id").set_index("protein_id")
    assert sorted(proteins["protein_id"]) == sorted(labels.index)
    for i, protein_id in enumerate(proteins["protein_id"]):
        row = labels.loc[protein_id]
        assert proteins["name"][i] == row["name"]
        assert row["name"] in page
        assert proteins["grade1"][i] == row["loc_grade1"]
        assert proteins["grade2"][i] == (row["loc_grade2"] or "–")
        main = row["loc_grade1"].split(";")[0]
        assert proteins["localization"][i] == main
        assert proteins["group"][i] in (main, OTHER_LABEL)
    # The tiny release's first protein is ER with golgi as its second grade.
    assert "golgi" in proteins["grade2"]

    # One thumbnail per protein: a 48x48 grey PNG of the first frame of the
    # protein, as bright on average as that frame's first channel.
    assert len(proteins["thumbnail"]) == 6
    assert len(frames["thumbnail"]) == 72
    assert all(uri.startswith(PNG_URI) for uri in frames["thumbnail"])
    frames_of = split.labels.lookup.groupby("protein_id")["frame_id"].min()
    for protein_id, uri in zip(
        proteins["protein_id"], proteins["thumbnail"], strict=True
    ):
        assert uri.startswith(PNG_URI)
        image = Image.open(io.BytesIO(base64.b64decode(uri[len(PNG_URI) :])))
        assert image.size == (48, 48) and image.mode == "L"
        crop = split.images.frames[frames_of[protein_id], ..., 0]
        assert np.asarray(image).mean() / 255 == pytest.approx(crop.mean(), abs=0.01)
    assert len(set(proteins["thumbnail"])) == 6

    # Each protein sits at the mean position of its frames.
    for i, protein_id in enumerate(proteins["protein_id"]):
        mine = np.asarray(frames["protein_id"]) == protein_id
        assert proteins["x"][i] == pytest.approx(np.mean(np.asarray(frames["x"])[mine]))
        assert proteins["y"][i] == pytest.approx(np.mean(np.asarray(frames["y"])[mine]))
    assert sorted(frames["frame_id"]) == sorted(split.labels.frame_ids.tolist())

    # Clicking lists the k nearest proteins of the embedding, as computed here
    # independently; the lists are in the page, one per protein.
    expected = _independent_knn(split, embeddings, K)
    ids = proteins["protein_id"]
    for i, protein_id in enumerate(ids):
        rows = list(proteins["neighbour_rows"][i])
        want_ids, want_distances = expected[protein_id]
        assert [ids[r] for r in rows] == want_ids
        listed = proteins["neighbours_html"][i]
        assert listed.count("<li>") == K
        names = re.findall(r"<li><b>(.*?)</b>", listed)
        assert names == [proteins["name"][r] for r in rows]
        shown = [float(d) for d in re.findall(r"· ([0-9.]+)</li>", listed)]
        np.testing.assert_allclose(shown, want_distances, atol=5e-4)
    # A frame's click shows its own protein's list.
    for protein_id, row in zip(
        frames["protein_id"], frames["protein_row"], strict=True
    ):
        assert ids[row] == protein_id


def test_writing_the_same_map_twice_gives_the_same_data(split, tmp_path):
    # Bokeh names every model of a page with a fresh id (a process-wide counter
    # and a random document id), so two writes never match byte for byte; the
    # data they carry, read back by Bokeh, must.
    embeddings, projection = _inputs(split)
    pages = [
        write_embedding_map(tmp_path / name, split, embeddings, projection, k=K)
        for name in ("a.html", "b.html")
    ]
    first, second = (_sources(p.read_text(encoding="utf-8")) for p in pages)
    assert first == second
    other, _ = _inputs(split, seed=1)
    third = write_embedding_map(tmp_path / "c.html", split, other, projection, k=K)
    assert _sources(third.read_text(encoding="utf-8")) != first


def test_frames_beyond_the_limit_are_a_seeded_sample(split, tmp_path):
    embeddings, projection = _inputs(split)
    path = write_embedding_map(
        tmp_path / "map.html", split, embeddings, projection, k=K, max_frames=20
    )
    page = path.read_text(encoding="utf-8")
    frames = _sources(page)["frames"]
    assert len(frames["frame_id"]) == len(set(frames["frame_id"])) == 20
    assert "shows 20 of the 72 frames (seed 0)" in page
    assert len(frames["thumbnail"]) == 20
    # The sample's positions are those of its frames in the projection.
    position = dict(
        zip(projection.frame_ids.tolist(), projection.coordinates, strict=True)
    )
    for frame_id, x, y in zip(
        frames["frame_id"], frames["x"], frames["y"], strict=True
    ):
        assert (x, y) == pytest.approx(tuple(position[frame_id]))


def test_labels_are_shown_as_text_never_as_markup(tmp_path):
    table = pd.DataFrame(
        {
            "protein_id": [1, 2, 3],
            "name": ["<img src=x onerror=alert(1)>", "A&B", "PLAIN"],
            "loc_grade1": ["er", "", "membrane"],
            "loc_grade2": ["", "", ""],
            "predominant_localization": ["er", "", "membrane"],
        }
    )
    path = write_interactive_map(
        tmp_path / "map.html",
        protein_xy=np.zeros((3, 2)),
        protein_table=table,
        neighbours=np.array([[1], [2], [0]]),
        title="<b>t</b>",
    )
    page = path.read_text(encoding="utf-8")
    proteins = _sources(page)["proteins"]
    assert "&lt;img src=x onerror=alert(1)&gt;" in proteins["neighbours_html"][2]
    assert "<img src=x" not in "".join(proteins["neighbours_html"])
    assert "A&amp;B" in proteins["neighbours_html"][0]
    assert "&lt;b&gt;t&lt;/b&gt;" in page
    # Unannotated and other localizations share the grey "other" legend entry.
    assert proteins["group"] == ["er", OTHER_LABEL, OTHER_LABEL]
    assert "thumbnail" not in proteins and "frames" not in _sources(page)


def test_inconsistent_inputs_are_refused(tmp_path):
    table = pd.DataFrame(
        {
            "protein_id": [1, 2],
            "name": ["A", "B"],
            "loc_grade1": ["er", "er"],
            "loc_grade2": ["", ""],
            "predominant_localization": ["er", "er"],
        }
    )
    with pytest.raises(ValueError, match="rows of protein_table"):
        write_interactive_map(
            tmp_path / "m.html",
            protein_xy=np.zeros((2, 2)),
            protein_table=table,
            neighbours=np.array([[1], [2]]),
        )
    with pytest.raises(ValueError, match="positions for 2 table rows"):
        write_interactive_map(
            tmp_path / "m.html",
            protein_xy=np.zeros((3, 2)),
            protein_table=table,
            neighbours=np.array([[1], [0]]),
        )
    assert not list(tmp_path.iterdir())


def test_figures_refuse_an_unknown_map_model_before_drawing(split, tmp_path):
    with pytest.raises(ValueError, match="map_model 'b' is none of the models"):
        write_model_figures({"a": (None, None)}, split, tmp_path / "f", map_model="b")
    assert not (tmp_path / "f").exists()
