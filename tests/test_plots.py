"""Figures: drawn without pyplot, so importing trade-md never switches the user's backend."""

import subprocess
import sys


def test_importing_the_figure_code_leaves_the_matplotlib_backend_alone(tmp_path):
    script = ("import matplotlib; matplotlib.use('svg'); "
              "import trademd.analysis.plots, trademd.sample, trademd.train; "
              "from trademd.analysis.plots import ramachandran_png; import numpy as np; "
              "png = ramachandran_png(np.zeros(10), np.zeros(10)); "
              "assert png[:4] == b'\\x89PNG'; print(matplotlib.get_backend())")
    # outside the source tree, so that the installed package is imported, not the folder
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                            cwd=tmp_path)
    assert result.stdout.strip() == "svg"
