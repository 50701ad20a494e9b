#!/usr/bin/env python
"""Few-shot transfer evaluation: zero-shot vs tuned prompts over shots x seeds and base-to-novel.

    python tools/eval_fewshot.py --config configs/eval/coop_benchmark.yaml --root /path/to/DATA

Writes results.csv, summary.md and accuracy_vs_shots.png into --output-dir. Same as
`vlprompt eval-fewshot`.
"""

import sys

from vlprompt.cli import main

if __name__ == "__main__":
    main(["eval-fewshot", *sys.argv[1:]])
