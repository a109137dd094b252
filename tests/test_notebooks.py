"""Execute every notebook in notebooks/ top to bottom; a cell that raises fails the test with its error.

The kernel is the stock "python3" kernelspec. ipykernel ships it with argv[0] = "python", which jupyter_client
replaces with sys.executable, so the notebooks run in the interpreter running pytest; a first probe cell checks
that (a stray user-level kernelspec pointing at another Python would otherwise give confusing import errors).
"""
import os
import re
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
PROBE = "import sys\nprint(sys.prefix)"


def test_notebooks_exist():
    assert NOTEBOOKS, f"no notebooks found in {NOTEBOOK_DIR}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")          # the kernel inherits the environment: no GUI windows
    nb = nbformat.read(path, as_version=4)
    nb.cells.insert(0, nbformat.v4.new_code_cell(PROBE))
    client = NotebookClient(nb, kernel_name="python3", timeout=300,
                            resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    error = None
    try:
        client.execute()
    except CellExecutionError as err:
        error = re.sub(r"\x1b\[[0-9;]*m", "", str(err))    # drop the terminal colours of the traceback
    if error is not None:                               # reported outside `except`: no chained traceback
        failed = next((i for i, c in enumerate(nb.cells)
                       if c.cell_type == "code" and any(o.output_type == "error" for o in c.get("outputs", []))), None)
        where = ("the interpreter probe" if failed == 0 else "a cell" if failed is None
                 else f"cell {failed - 1} (0-based, markdown cells included)")
        pytest.fail(f"{path.name}: {where} raised\n{_wrong_kernel(nb) or ''}\n{error}", pytrace=False)
    problem = _wrong_kernel(nb)
    assert not problem, problem


def _wrong_kernel(nb) -> str | None:
    """A message if the probe cell shows the kernel ran outside this environment, else None."""
    out = "".join(o.get("text", "") for o in nb.cells[0].get("outputs", []) if o.output_type == "stream").strip()
    if out and os.path.realpath(out) == os.path.realpath(sys.prefix):
        return None
    return (f"the 'python3' kernel ran in {out or 'an unknown environment'!r}, not in this one ({sys.prefix!r}); "
            f"run `{sys.executable} -m ipykernel install --sys-prefix` or remove the stray kernelspec")
