"""Every notebook in notebooks/ runs top to bottom with a real kernel and shows its plots.

They run where they are (their working directory is notebooks/, as in Jupyter) with
``NOTEBOOK_BUDGET=ci``: a notebook that trains reads its budget from that one variable, and at
that budget writes only to temporary folders. The executed copy stays in memory, so the committed
notebooks and their outputs stay as they are.
"""
import glob
import os
import re

import pytest

from conftest import shared_compile_cache

nbformat = pytest.importorskip('nbformat')
nbclient = pytest.importorskip('nbclient')

NOTEBOOK_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'notebooks')
NOTEBOOKS = sorted(glob.glob(os.path.join(NOTEBOOK_DIR, '*.ipynb')))


def test_the_notebooks_are_there():
    names = [os.path.basename(p) for p in NOTEBOOKS]
    assert names == ['01_quickstart.ipynb', '02_attention_variants.ipynb', '03_dfc_attention_maps.ipynb',
                     '04_ablations.ipynb']


def _images(nb) -> int:
    return sum('image/png' in out.get('data', {}) for cell in nb.cells if cell.cell_type == 'code'
               for out in cell.get('outputs', []))


def _needs_torch(path: str) -> bool:
    """A notebook whose code cells import torch, timm or the parity module."""
    import nbformat
    cells = nbformat.read(path, as_version=4).cells
    return any(c.cell_type == 'code' and re.search(r'\b(torch|timm|parity)\b', c.source) for c in cells)


@pytest.mark.parametrize('path', [pytest.param(p, marks=pytest.mark.torch) if _needs_torch(p) else p
                                  for p in NOTEBOOKS], ids=os.path.basename)
def test_notebook_runs_top_to_bottom(path, monkeypatch, tmp_path_factory):
    committed = nbformat.read(path, as_version=4)
    assert _images(committed) > 0, 'the committed notebook carries its plots as images'
    monkeypatch.setenv('NOTEBOOK_BUDGET', 'ci')
    monkeypatch.setenv('JAX_COMPILATION_CACHE_DIR', str(shared_compile_cache(tmp_path_factory)))
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name='python3',
                                     resources={'metadata': {'path': NOTEBOOK_DIR}})
    client.execute()    # raises CellExecutionError naming the cell on any error
    errors = [out for cell in nb.cells if cell.cell_type == 'code' for out in cell.get('outputs', [])
              if out.get('output_type') == 'error']
    assert not errors
    assert _images(nb) == _images(committed), 'every plot of the committed notebook is drawn again'
