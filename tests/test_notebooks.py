"""Both notebooks execute top to bottom (nbclient) with their parameters cell set to the tiny
configs, and leave their filmstrips and results where they say."""

import json
import os

import nbformat
import pytest

nbclient = pytest.importorskip("nbclient")

HERE = os.path.dirname(os.path.abspath(__file__))
NOTEBOOKS = os.path.join(os.path.dirname(HERE), "notebooks")
pytestmark = pytest.mark.slow


def _execute(name: str, params: dict, cwd: str):
    """papermill's convention: a cell right after the one tagged `parameters` overrides it."""
    nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    i = next(k for k, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    nb.cells.insert(i + 1, nbformat.v4.new_code_cell(
        "\n".join(f"{k} = {v!r}" for k, v in params.items())))
    # A bound against a hung kernel, not a speed target: cells here train and paint.
    nbclient.NotebookClient(nb, timeout=3600, kernel_name="python3",
                            resources={"metadata": {"path": cwd}}).execute()
    return nb


def _images_shown(nb) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code"
               for o in c.get("outputs", []))


def test_quickstart_runs_and_shows_filmstrips(tmp_path):
    w = str(tmp_path / "w")
    nb = _execute("quickstart.ipynb", dict(CONFIG="shapes_tiny:test", WORKDIR=w, INSTALL=False,
                                           PROMPTS=["a photo of a red circle"]), str(tmp_path))
    assert _images_shown(nb) == 2  # the prompt, both ways
    for mode in ("process", "single"):
        assert os.path.isfile(os.path.join(w, "generate", "00000", f"{mode}_0_filmstrip.png"))
    assert os.path.isfile(os.path.join(w, "report", "report.md"))


def test_geneval_notebook_runs_the_chain(tmp_path):
    w = str(tmp_path / "w")
    # INT8: the notebook's memory plan for BAGEL on one v5e, here on the tiny model.
    nb = _execute("geneval.ipynb", dict(CONFIG="shapes_tiny:test", WORKDIR=w, INSTALL=False,
                                        PER_TAG=1, N=2, INT8=True), str(tmp_path))
    out = os.path.join(w, "geneval", "process")
    rows = [json.loads(line) for line in open(os.path.join(out, "results.jsonl"))]
    assert len(rows) == 6 * 2  # six GenEval tags, one prompt each, two images
    assert _images_shown(nb) == 1
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.get("outputs", []))
    assert "Overall score" in text
    assert "--config.eval.int8=True" in text  # the painting command ran with int8 experts
