"""The Colab notebook runs end to end on CPU: its parameters cell set to this checkout, the tiny
synthetic config and no Google Drive (nbclient + ipykernel). It installs what it uses (the
package with the torch extra), trains the source-only and the PiPa demo, shows the report and
re-evaluates the checkpoint; the Drive / full-dataset cells are skipped by ON_COLAB = False."""
import os
import sys

import nbclient
import nbformat


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "colab", "pipa_jax.ipynb")


def test_colab_notebook_runs_on_cpu(tmp_path, xla_cache_dir, monkeypatch):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1, "the notebook needs exactly one cell tagged 'parameters'"
    params[0].source += (f"\nREPO = {ROOT!r}\nTINY = True\nON_COLAB = False\nINSTALL = True\n"
                         f"RUNS = {str(tmp_path)!r}\nEXTRA = '--config.compilation_cache_dir={xla_cache_dir}'\n")
    # The notebook's `!python` / `!pip` are this environment's.
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    client = nbclient.NotebookClient(nb, timeout=1500, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "done: step 4" in outputs                       # both demo runs finished (tiny: 4 steps)
    assert os.path.exists(tmp_path / "demo" / "predictions.png")
    shown = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "display_data"]
    assert any("image/png" in o.data for o in shown) and any("text/markdown" in o.data for o in shown)
    assert "mIoU" in outputs                               # the evaluation CLI printed its table
