"""Every Colab notebook runs end to end on the embedded sample."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parent.parent / "colab").glob("*.ipynb"))


def test_there_are_notebooks():
    assert NOTEBOOKS, "colab/ has no notebooks"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path):
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()  # raises CellExecutionError, with the cell, on any error
    outputs = [o for cell in notebook.cells for o in cell.get("outputs", [])]
    assert any(o.get("output_type") == "display_data" for o in outputs), "no figure"
