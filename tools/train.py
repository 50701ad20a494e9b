#!/usr/bin/env python
"""Train a prompt: a thin wrapper over `vlprompt fit` (LightningCLI).

    python tools/train.py --config configs/backbones/shapeworld_tiny.yaml \
        --config configs/methods/coop.yaml --config configs/data/imagefolder.yaml \
        --data.init_args.root path/to/images --trainer.max_epochs 50

Any `vlprompt fit` option works; `--help` lists them.
"""

import sys

from vlprompt.cli import main

if __name__ == "__main__":
    main(["fit", *sys.argv[1:]])
