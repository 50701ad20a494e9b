#!/usr/bin/env python
"""Classify images with a saved prompt: a thin wrapper over `vlprompt classify`.

    python tools/classify.py --prompt lightning_logs/version_0/prompt --images path/to/images --out outputs/classify

Any `vlprompt classify` option works; `--help` lists them.
"""

import sys

from vlprompt.cli import main

if __name__ == "__main__":
    main(["classify", *sys.argv[1:]])
