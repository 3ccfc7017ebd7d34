"""Compiles UMAP's numba code into the test session's numba cache while holding
the lock at `sys.argv[1]`: the whole-suite session starts it first thing, and a
test process's first UMAP waits for the lock, then loads what it compiled
(conftest.py, `_wait_for_umap`).

    python tests/_compile_umap.py LOCK_PATH
"""

import sys

from filelock import FileLock

if __name__ == "__main__":
    with FileLock(sys.argv[1]):
        from dlfb_localization.projection import compile_umap

        compile_umap()
