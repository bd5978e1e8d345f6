"""Time training steps of every flow: the same as ``vaeflow bench`` (see ``--help``).

python experiments/bench.py --smoke                     # CPU smoke test
python experiments/bench.py --device cuda --size paper  # the GPU figures
"""

from __future__ import annotations

import sys

from vaeflow.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
