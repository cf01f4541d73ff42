"""A pytest plugin (loaded by `-p` in pyproject's addopts, before any capture starts) that
restarts the test run once with the optimized BLAS preloaded, as the node's CLI does.

In-process tests run real MLX models; with the mlx-cpu wheel's reference BLAS their
float32 prefills are ~20x slower than a node's. Node processes the tests start inherit
the preload (and do not re-execute themselves).
"""

from __future__ import annotations

import sys
from pathlib import Path

from exo_tools.blas import reexec_with_fast_blas

# Only a run started from the command line (`python -m pytest`, `pytest`) can be restarted
# with the same arguments; pytest.main() from another program is left alone.
if Path(sys.argv[0]).name in ("pytest", "py.test", "__main__.py"):
    reexec_with_fast_blas(["-m", "pytest", *sys.argv[1:]])
