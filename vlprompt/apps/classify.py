"""Classify images with a saved prompt: ``classify_images`` in Python, ``vlprompt classify`` on the
command line.

    from vlprompt.apps.classify import classify_images
    predictions = classify_images("prompts/pets-coop", "photos/")      # backbone rebuilt from the prompt
    predictions[0].label, predictions[0].probability

Images are preprocessed by the backbone's own evaluation transform and scored exactly as in
training and evaluation (:func:`vlprompt.methods.prompt_logits`).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["Prediction", "classify_images", "main"]

log = logging.getLogger(__name__)


@dataclass
class Prediction:
    """The class of one image: ``label`` (class name) and ``index`` (its label) with
    ``probability``; ``top`` holds the five most probable classes; ``status`` is ``ok`` or
    ``unreadable`` (then no class)."""

    path: str
    label: str = ""
    index: int = -1
    probability: float = 0.0
    top: list[tuple[str, float]] = field(default_factory=list)
    status: str = "ok"


def _image_paths(images) -> list:
    from vlprompt.data.sources import IMAGE_EXTENSIONS

    if isinstance(images, (str, Path)):
        root = Path(images).expanduser()
        if root.is_dir():
            found = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise ValueError(f"{root} contains no images ({', '.join(IMAGE_EXTENSIONS)})")
            return found
        if not root.exists():
            raise FileNotFoundError(f"no such image or folder: {root}")
        return [root]
    return list(images)


def classify_images(prompt, images, *, backbone=None, classnames: Sequence[str] | None = None,
                    batch_size: int = 32, device: str | None = None) -> list[Prediction]:
    """Classify ``images`` (a folder, a file, or a list of paths / PIL images) with ``prompt`` (a
    saved prompt directory or a :class:`~vlprompt.prompts.PromptLearner`).

    Args:
        backbone: the encoder; default: rebuilt from the saved prompt's record.
        classnames: classify into these classes instead of the prompt's own.
        batch_size: images per forward pass.
        device: ``cpu``, ``cuda`` ...; default: CUDA when available.
    Unreadable files are skipped, logged and returned with status ``unreadable``.
    """
    import torch
    from PIL import Image

    from vlprompt.data.images import UnreadableImageError, build_eval_transform, load_rgb, to_rgb
    from vlprompt.methods.scoring import prompt_logits
    from vlprompt.prompts import PromptLearner, load_prompt

    learner = prompt if isinstance(prompt, PromptLearner) else load_prompt(prompt, backbone, classnames=classnames)
    if classnames is not None and isinstance(prompt, PromptLearner):
        learner.set_classnames(classnames)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    backbone = learner.backbone.to(device)
    learner.to(device).eval()
    transform = build_eval_transform(backbone.preprocess_cfg)
    names = learner.classnames
    out: list[Prediction] = []
    batch: list[tuple[int, torch.Tensor]] = []

    def flush() -> None:
        if not batch:
            return
        with torch.no_grad():
            tensors = torch.stack([t for _, t in batch]).to(device)
            probs = prompt_logits(learner(images=tensors), backbone).softmax(-1).cpu()
        for (slot, _), p in zip(batch, probs):
            top = p.topk(min(5, len(names)))
            out[slot] = Prediction(out[slot].path, names[int(top.indices[0])], int(top.indices[0]), float(top.values[0]),
                                   [(names[int(i)], round(float(v), 5)) for v, i in zip(top.values, top.indices)])
        batch.clear()

    for item in _image_paths(images):
        name = str(item) if not isinstance(item, Image.Image) else f"<image {len(out)}>"
        out.append(Prediction(name))
        try:
            image = to_rgb(item) if isinstance(item, Image.Image) else load_rgb(str(item))
        except UnreadableImageError as err:
            log.warning("skipping %s", err)
            out[-1].status = "unreadable"
            continue
        batch.append((len(out) - 1, transform(image)))
        if len(batch) == batch_size:
            flush()
    flush()
    skipped = sum(p.status != "ok" for p in out)
    if skipped:
        log.warning("%d unreadable images skipped", skipped)
    return out


def main(argv: list[str] | None = None) -> None:
    """``vlprompt classify`` / ``tools/classify.py``."""
    parser = argparse.ArgumentParser(prog="vlprompt classify", description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt", required=True, help="a saved prompt directory (config.json + prompt.safetensors)")
    parser.add_argument("--images", required=True, nargs="+", help="a folder (searched recursively) or image files")
    parser.add_argument("--classnames", nargs="+", help="classify into these classes instead of the prompt's own")
    parser.add_argument("--classnames_file", help="class names, one per line")
    parser.add_argument("--out", default="outputs/classify", help="where predictions.csv / .json are written")
    parser.add_argument("--overwrite", action="store_true", help="replace predictions already in --out")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    out = Path(args.out).expanduser()
    if not args.overwrite and any((out / n).exists() for n in ("predictions.csv", "predictions.json")):
        raise FileExistsError(f"{out} already holds predictions; pass --overwrite or another --out")
    classnames = args.classnames
    if args.classnames_file:
        from vlprompt.data.classnames import read_classnames_file

        classnames = [name for _, name in read_classnames_file(args.classnames_file)]
    images = args.images[0] if len(args.images) == 1 else args.images
    predictions = classify_images(args.prompt, images, classnames=classnames, batch_size=args.batch_size,
                                  device=args.device)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "predictions.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "status", "label", "probability", "top5"])
        for p in predictions:
            writer.writerow([p.path, p.status, p.label, round(p.probability, 5) if p.status == "ok" else "",
                             "; ".join(f"{n} {v:.3f}" for n, v in p.top)])
    (out / "predictions.json").write_text(json.dumps([asdict(p) for p in predictions], indent=1) + "\n")
    ok = [p for p in predictions if p.status == "ok"]
    log.info("%d images classified, %d unreadable skipped; predictions in %s", len(ok), len(predictions) - len(ok), out)
