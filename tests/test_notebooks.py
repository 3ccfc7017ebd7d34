"""Every Colab notebook runs end to end on the embedded sample, with tiny sizes.

As papermill does, a cell is injected right after each notebook's cell tagged
`parameters`: it overrides the size knobs with tiny values and sets environment
variables before anything imports JAX or the library. All notebooks run, in the
order 01, 02, …, in one working folder that they share: the sample lands in the
same `SAMPLE_DIR`, and `DLFB_ASSETS_DIR` (read by `dlfb_localization.assets` at
call time) points the models into it, so 04 and 05 restore the models that 03
and 04 stored instead of training them again (checked below, whenever the
earlier notebook ran in the same pytest-xdist worker: workers share no folder).
Each notebook also runs alone (e.g. `-k 05`); it then trains what it needs.

The notebooks of one worker run in one Jupyter kernel, one after the other,
each starting with `%reset -f`: its namespace is empty, as in a fresh kernel,
so a name it forgot to define or import still fails, but the modules it
imports, numba's compiled UMAP and JAX's compiled programs are already there
(a fresh kernel spent 5-10 s on each). The kernels inherit the session's JAX
and numba settings and caches (conftest.py).
"""

import sys
from pathlib import Path

import nbformat
import pytest
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient
from nbclient.util import run_sync

NOTEBOOKS = sorted((Path(__file__).parent.parent / "colab").glob("*.ipynb"))
PARAMETERS_TAG = "parameters"
# Small enough for a 2-core CPU; a notebook ignores the knobs it does not use.
TINY_PARAMETERS = {
    "NUM_EPOCHS": 1,
    "BATCH_SIZE": 16,
    "EMBEDDING_DIM": 8,
    "NUM_EMBEDDINGS": 32,
    "N_FRAMES": 4,
    "SAMPLE_PROTEINS": 12,
    "SAMPLE_CROPS_PER_FOV": 6,
    # 32x32 crops instead of OpenCell's 100x100: a tenth of the pixels to
    # generate, train on and embed; every model takes any multiple of 4.
    "SAMPLE_IMAGE_SIZE": 32,
    "IMAGE_SIZE": 16,  # 07's crops, resized
    "UNET_DEPTH": 1,
    "VIT_DEPTH": 1,
    "PATCH_SIZE": 8,  # 09's ViT: 32x32 crops in 4x4 patches
}


def inject_parameters(
    notebook: nbformat.NotebookNode, parameters: dict, environment: dict[str, str]
) -> int:
    """Inserts a cell setting `environment` and `parameters` right after the
    `parameters` cell; returns the new cell's index.

    Raises:
      ValueError: the notebook has no (or more than one) code cell tagged
        `parameters`, so there is nowhere to put its sizes.
    """
    tagged = [
        index
        for index, cell in enumerate(notebook.cells)
        if cell.cell_type == "code"
        and PARAMETERS_TAG in cell.get("metadata", {}).get("tags", [])
    ]
    if len(tagged) != 1:
        raise ValueError(
            f"a notebook needs exactly one code cell tagged {PARAMETERS_TAG!r} "
            f"holding its size knobs, found {len(tagged)}"
        )
    lines = [
        "import os",
        "",
        *(f"os.environ[{name!r}] = {value!r}" for name, value in environment.items()),
        *(f"{name} = {value!r}" for name, value in parameters.items()),
    ]
    cell = nbformat.v4.new_code_cell(
        "\n".join(lines), metadata={"tags": ["injected-parameters"]}
    )
    notebook.cells.insert(tagged[0] + 1, cell)
    return tagged[0] + 1


def kernel_environment(workdir: Path) -> dict[str, str]:
    return {
        "DLFB_ASSETS_DIR": str(workdir / "assets"),
    }


def stored_models(workdir: Path) -> set[str]:
    """Names of the folders `assets("localization/models/<name>")` holds."""
    models = workdir / "assets" / "localization" / "models"
    return {p.name for p in models.iterdir()} if models.is_dir() else set()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """The kernels' working folder, shared by all notebooks of this module."""
    return tmp_path_factory.mktemp("notebooks")


@pytest.fixture(scope="module")
def kernel(workdir):
    """This worker's kernel (started in `workdir`), restarted if it died."""
    manager = AsyncKernelManager(kernel_name="python3")

    def alive_kernel() -> AsyncKernelManager:
        if not run_sync(manager.is_alive)():
            run_sync(manager.start_kernel)(cwd=str(workdir))
        return manager

    yield alive_kernel
    if run_sync(manager.is_alive)():
        run_sync(manager.shutdown_kernel)(now=True)


RESET = '%reset -f\nimport matplotlib.pyplot as _plt\n\n_plt.close("all")\ndel _plt'


def test_there_are_notebooks():
    assert NOTEBOOKS, "colab/ has no notebooks"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    assert notebook.nbformat == 4
    assert notebook.metadata["kernelspec"]["name"] == "python3"
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source


def test_a_notebook_without_parameters_cell_fails_the_precondition(tmp_path):
    notebook = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_code_cell("NUM_EPOCHS = 10")]
    )
    with pytest.raises(ValueError, match="tagged 'parameters'"):
        inject_parameters(notebook, TINY_PARAMETERS, kernel_environment(tmp_path))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, workdir, kernel):
    notebook = nbformat.read(path, as_version=4)
    injected = inject_parameters(notebook, TINY_PARAMETERS, kernel_environment(workdir))
    notebook.cells.insert(0, nbformat.v4.new_code_cell(RESET))
    injected += 1
    stored_before = stored_models(workdir)
    client = NotebookClient(notebook, timeout=600, km=kernel())
    try:
        client.execute()  # raises CellExecutionError, with the cell, on any error
    finally:
        if client.kc is not None:
            client.kc.stop_channels()
    assert notebook.cells[injected].get("outputs") == []
    outputs = [o for cell in notebook.cells for o in cell.get("outputs", [])]
    assert any(o.get("output_type") == "display_data" for o in outputs), "no figure"
    # A model that an earlier notebook stored is restored: no progress bar.
    for cell in notebook.cells:
        for name in stored_before:
            if f'assets("localization/models/{name}")' in cell.source:
                log = "".join(o.get("text", "") for o in cell.get("outputs", []))
                assert "Epoch" not in log, f"trained {name!r} again, not restored"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_on_colab_the_install_cell_installs_the_checkout_it_finds(
    path, monkeypatch, tmp_path
):
    """The first code cell, run as on Colab (a `google.colab` module present)
    from the repository's `colab/` folder, pip-installs the repository's root;
    with no checkout and no REPOSITORY set it stops with what to do."""
    from IPython.core.inputtransformer2 import TransformerManager

    notebook = nbformat.read(path, as_version=4)
    install = next(cell for cell in notebook.cells if cell.cell_type == "code")
    code = TransformerManager().transform_cell(install.source)
    magics = []

    class Shell:
        def run_line_magic(self, name, line, _stack_depth=1):
            magics.append((name, line.format(**namespace)))

    monkeypatch.setitem(sys.modules, "google.colab", object())
    monkeypatch.chdir(path.parent)
    namespace = {"get_ipython": Shell}
    exec(code, namespace)
    assert magics == [("pip", f"install -q {path.parent.parent}")]

    monkeypatch.chdir(tmp_path)
    namespace = {"get_ipython": Shell}
    with pytest.raises(RuntimeError, match="clone the repository"):
        exec(code, namespace)
