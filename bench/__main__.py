"""``python -m bench``: run the benchmark (see ``bench/run.py``)."""

from __future__ import annotations

from .run import main

if __name__ == "__main__":
    main()
