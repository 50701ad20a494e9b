#!/usr/bin/env python
"""Multitask prompt tuning (MVLPT): a source prompt tuned on several tasks, used on target tasks.

    python tools/eval_multitask.py --config configs/eval/mvlpt_elevater.yaml --root /path/to/DATA

Writes results.csv, summary.md and the prompts into --output-dir. Same as `vlprompt eval-multitask`.
"""

import sys

from vlprompt.cli import main

if __name__ == "__main__":
    main(["eval-multitask", *sys.argv[1:]])
