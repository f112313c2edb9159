"""The notebooks run top to bottom in a real kernel, and the %%ranks magic behaves there."""

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = pathlib.Path(__file__).parent.parent / "notebooks"


def client(nb, cwd, **kwargs):
    # The kernel runs in the test's own folder (pytest removes it), not in the checkout.
    return NotebookClient(nb, kernel_name="python3", resources={"metadata": {"path": str(cwd)}},
                          **kwargs)


def execute(nb, cwd, **kwargs):
    client(nb, cwd, timeout=300, **kwargs).execute()
    return nb


def text_of(cell):
    parts = []
    for out in cell.get("outputs", []):
        parts.append(out.get("text", "") or "".join(out.get("data", {}).get("text/plain", "")))
    return "".join(parts)


@pytest.mark.parametrize("name", sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")))
def test_notebook_runs_top_to_bottom(name, tmp_path):
    nb = execute(nbformat.read(NOTEBOOKS / name, as_version=4), tmp_path)
    outputs = "".join(text_of(c) for c in nb.cells if c.cell_type == "code")
    assert "Traceback" not in outputs or name == "debugging.ipynb", outputs
    if name == "quickstart.ipynb":
        assert "[rank 3] Array([ 6., 10., 14., 18.], dtype=float32)" in outputs
        assert "rank 3 received [42.]" in outputs
    if name == "tensor_parallel.ipynb":
        assert "largest relative gap between the curves" in outputs
    if name == "debugging.ipynb":
        assert "collective mismatch" in outputs
        assert "closed the connection" in outputs and "exited with code 3" in outputs


def cells(*sources):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(s) for s in sources]
    return nb


def test_magic_keeps_state_interrupts_and_restarts(tmp_path):
    nb = cells(
        "%load_ext jax_mlxdist.notebook",
        "%%ranks -n 2\nimport jax_mlxdist as dist\ng = dist.init()\nx = 10 * g.rank()",
        # The endless loop is the subject: the kernel interrupt must reach both ranks.
        "%%ranks -n 2\nimport time\nprint('looping', flush=True)\nwhile True:\n    time.sleep(0.05)",
        "%%ranks -n 2\nx + 1",
        "from jax_mlxdist import notebook\nnotebook.cluster().gather('x')",
        "%ranks restart",
        "%%ranks -n 2\n'x' in dir()",
        "%ranks close",
    )
    client(nb, tmp_path, timeout=20, interrupt_on_timeout=True).execute()
    out = [text_of(c) for c in nb.cells]
    assert "KeyboardInterrupt" in out[2] and "[rank 1] looping" in out[2]
    assert "[rank 0] 1" in out[3] and "[rank 1] 11" in out[3]  # state survived the interrupt
    assert "[0, 10]" in out[4]
    assert "[rank 0] False" in out[6] and "[rank 1] False" in out[6]  # restart cleared it


def test_timeline_plots_every_ranks_last_ops(tmp_path):
    nb = cells(
        "%load_ext jax_mlxdist.notebook",
        "%%ranks -n 2\nimport jax.numpy as jnp\nimport jax_mlxdist as dist\ng = dist.init()\n"
        "for _ in range(5):\n    dist.all_sum(jnp.ones(1000))",
        "%ranks timeline 4",
        "from jax_mlxdist import notebook\nfig = notebook.cluster().timeline(3)\n"
        "[t.get_text() for t in fig.axes[0].get_yticklabels()], len(fig.axes[0].collections)",
        "%ranks close",
    )
    client(nb, tmp_path, timeout=120).execute()
    assert any("image/png" in out.get("data", {}) for out in nb.cells[2].outputs), nb.cells[2].outputs
    import re
    found = re.search(r"\(\['rank 0', 'rank 1'\], (\d+)\)", text_of(nb.cells[3]))
    assert found, text_of(nb.cells[3])
    assert int(found.group(1)) >= 2 * 3  # at least one bar (waiting or moving) per op per rank
