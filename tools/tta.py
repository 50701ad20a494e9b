#!/usr/bin/env python
"""Test-time prompt tuning (TPT, DiffTPT) on a folder of images: a thin wrapper over `vlprompt tta`.

    python tools/tta.py --config configs/backbones/shapeworld_tiny.yaml --config configs/tta/tpt.yaml \
        --images path/to/images --classnames_file classes.txt --out outputs/tta

Any `vlprompt tta` option works; `--help` lists them.
"""

import sys

from vlprompt.cli import main

if __name__ == "__main__":
    main(["tta", *sys.argv[1:]])
