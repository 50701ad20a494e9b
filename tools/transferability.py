#!/usr/bin/env python
"""Task transferability: the task x task transfer matrix, its heat map and task groups.

    python tools/transferability.py --config configs/eval/shapeworld_transferability.yaml

Writes accuracy.csv, gain.csv, transfer.png and groups.md into --output-dir. Same as
`vlprompt transferability`.
"""

import sys

from vlprompt.cli import main

if __name__ == "__main__":
    main(["transferability", *sys.argv[1:]])
