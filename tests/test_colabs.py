"""Every code cell of every notebook in colabs/ runs, at smoke-test size (`TINY`), in a real
Jupyter kernel (nbclient), as a user would run it top to bottom; any error fails the test."""
import glob
import os

import nbclient  # The test extra installs them (and ipykernel): a missing one is a failure.
import nbformat
import pytest

from conftest import REPO

NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, "colabs", "*.ipynb")))


def test_every_capability_has_a_notebook():
  names = {os.path.basename(p) for p in NOTEBOOKS}
  assert {"quickstart.ipynb", "noise_schedules.ipynb", "cascade.ipynb", "growth.ipynb",
          "objectives.ipynb"} <= names



@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_is_committed_with_its_outputs(path):
  """What a reader sees on GitHub before running anything: every code cell ran (in order, no
  errors) and at least one figure or sample grid is saved."""
  nb = nbformat.read(path, as_version=4)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
  outputs = [o for c in code for o in c.get("outputs", [])]
  assert not [o for o in outputs if o.get("output_type") == "error"]
  assert any("image/png" in o.get("data", {}) for o in outputs)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, tmp_path, monkeypatch):
  monkeypatch.setenv("DIFFLAX_COLAB_TINY", "1")
  monkeypatch.setenv("DIFFLAX_COLAB_WORKDIR", str(tmp_path))
  monkeypatch.setenv("MPLBACKEND", "Agg")
  nb = nbformat.read(path, as_version=4)
  assert nb.cells[1].cell_type == "code" and "pip" in nb.cells[1].source  # The install cell.
  assert "github.com/difflax/difflax" in nb.cells[1].source  # The README's URL, no placeholder.
  nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}}).execute()
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if o.get("output_type") == "error"]
  assert not errors, errors
