#!/usr/bin/env python
"""Segment a folder of images with text prompts (masks, overlays, segments.csv).

    python tools/segment.py --images photos/ --text "red star" "blue circle" --out outputs/segment

Same as `vlprompt segment`.
"""

import sys

from vlprompt.cli import main

if __name__ == "__main__":
    main(["segment", *sys.argv[1:]])
