#!/usr/bin/env python
"""Which open_clip models vlprompt prompts, and how: the support table.

    python tools/zoo_support.py              # one row per family (the README's table)
    python tools/zoo_support.py --per-model  # one row per open_clip model name

Every name in ``open_clip.list_models()`` is built on the meta device (no weights, no download:
hub tokenizers and text towers are replaced by offline stand-ins) and wrapped in
``OpenCLIPBackbone``; see ``vlprompt.backbones.support``. Takes about half a minute.
"""

import argparse
import logging
import tempfile

import open_clip

from vlprompt.backbones.support import family_table, format_family_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-model", action="store_true", help="one row per model instead of per family")
    parser.add_argument("models", nargs="*", help="model names (default: all of open_clip.list_models())")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as folder:
        families = family_table(args.models or open_clip.list_models(), folder)
    if not args.per_model:
        print(format_family_table(families))
        return
    print("| model | params (M) | image tower | text tower | tokenizer | visual prompts | exact truncation |")
    print("|---|---|---|---|---|---|---|")
    rows = sorted((r for group in families.values() for r in group), key=lambda r: r.name.lower())
    for r in rows:
        print(f"| {r.name} | {r.params / 1e6:.0f} | {r.image_tower} | {r.text_tower} | {r.tokenizer} | "
              f"{'yes' if r.visual_prompts else 'no'} | {'yes' if r.truncation else 'no'} |")


if __name__ == "__main__":
    main()
