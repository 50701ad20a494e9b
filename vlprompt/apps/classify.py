"""Classify images with a saved prompt: ``classify_images`` in Python, ``vlprompt classify`` on the
command line.

    from vlprompt.apps.classify import classify_images
    predictions = classify_images("prompts/pets-coop", "photos/")      # backbone rebuilt from the prompt
    predictions[0].label, predictions[0].probability

Images are preprocessed by the backbone's own evaluation transform and scored exactly as in
training and evaluation (:func:`vlprompt.methods.prompt_logits`).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from vlprompt.apps.runner import CommandParser, expand_image_inputs

if TYPE_CHECKING:
    from PIL.Image import Image

    from vlprompt.backbones import Backbone
    from vlprompt.prompts import PromptLearner

__all__ = ["OUTPUT_NAMES", "Prediction", "classify_images", "main", "write_predictions"]

log = logging.getLogger(__name__)

#: the files ``vlprompt classify`` writes into ``--out``
OUTPUT_NAMES = ("predictions.csv", "predictions.json")

ImageInput = Union[str, Path, "Image"]


@dataclass
class Prediction:
    """The class of one image.

    Attributes:
        path: the image file, or ``<image i>`` for the i-th image when it was given in memory.
        label: the predicted class name ("" when ``status`` is ``unreadable``).
        index: the predicted class's position in the class names (-1 when unreadable).
        probability: softmax probability of the predicted class.
        top: the ``top_k`` most probable classes, ``(class name, probability)``, best first.
        status: ``ok``, or ``unreadable`` when the file could not be decoded (then no class).
    """

    path: str
    label: str = ""
    index: int = -1
    probability: float = 0.0
    top: list[tuple[str, float]] = field(default_factory=list)
    status: str = "ok"


def classify_images(
    prompt: str | Path | PromptLearner,
    images: ImageInput | Sequence[ImageInput],
    *,
    backbone: Backbone | None = None,
    classnames: Sequence[str] | None = None,
    batch_size: int = 32,
    device: str | None = None,
    top_k: int = 5,
) -> list[Prediction]:
    """Classify ``images`` with ``prompt``; one :class:`Prediction` per image, in input order.

    Args:
        prompt: a saved prompt directory (``config.json`` + ``prompt.safetensors``) or a
            :class:`~vlprompt.prompts.PromptLearner` (used in place, on its own backbone, and moved
            to ``device``; its class names are restored afterwards).
        images: a folder (searched recursively), an image file, a PIL image, or a list of those.
        backbone: the encoder for a saved prompt; default: rebuilt from the prompt's record.
        classnames: classify into these classes instead of the prompt's own.
        batch_size: images per forward pass.
        device: ``cpu``, ``cuda`` ...; default: CUDA when available.
        top_k: how many of the most probable classes each prediction lists.

    Unreadable files are skipped, logged, counted and returned with status ``unreadable``; paths
    that do not exist raise :class:`FileNotFoundError` before anything is computed.
    """
    from vlprompt.data.classnames import check_distinct_classnames

    if batch_size < 1 or top_k < 1:
        raise ValueError(f"batch_size and top_k must be at least 1 (got {batch_size} and {top_k})")
    if classnames is not None:
        # Two classes of one name would split the probability between them.
        check_distinct_classnames(list(classnames), "classnames")
    items = expand_image_inputs(images)
    with _prompt_in_use(prompt, backbone, classnames, device) as (learner, device):
        out = _predict(learner, items, batch_size, device, top_k)
    skipped = sum(p.status != "ok" for p in out)
    if skipped:
        log.warning("%d of %d images unreadable, skipped", skipped, len(out))
    return out


@contextlib.contextmanager
def _prompt_in_use(prompt: str | Path | PromptLearner, backbone: Backbone | None, classnames: Sequence[str] | None,
                   device: str | None) -> Iterator[tuple[PromptLearner, str]]:
    """The prompt learner to classify with, in eval mode on ``device`` (default: CUDA when
    available), and that device. A learner given in memory gets its class names and training mode
    back afterwards; a saved prompt is loaded (on ``backbone``, or the backbone it records)."""
    import torch

    from vlprompt.prompts import PromptLearner, load_prompt

    given = isinstance(prompt, PromptLearner)
    if given:
        if backbone is not None and backbone is not prompt.backbone:
            raise ValueError("a PromptLearner brings its own backbone; pass backbone= only with a saved prompt directory")
        learner = prompt
        own_names, was_training = list(learner.classnames), learner.training
        if classnames is not None:
            learner.set_classnames(list(classnames))
    else:
        learner = load_prompt(prompt, backbone, classnames=list(classnames) if classnames is not None else None)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        learner.to(device).eval()
        yield learner, device
    finally:
        if given:
            if classnames is not None:
                learner.set_classnames(own_names)
                learner.to(device)  # new class-name buffers are created on the CPU
            learner.train(was_training)


def _predict(learner: PromptLearner, items: list[ImageInput], batch_size: int, device: str, top_k: int) -> list[Prediction]:
    """One prediction per item, in order: images decoded and scored ``batch_size`` at a time;
    unreadable ones logged and marked."""
    from vlprompt.data.images import UnreadableImageError, build_eval_transform, load_rgb, to_rgb

    transform = build_eval_transform(learner.backbone.preprocess_cfg)
    out: list[Prediction] = []
    batch: list[tuple[int, Any]] = []
    for item in items:
        in_memory = not isinstance(item, (str, Path))
        out.append(Prediction(f"<image {len(out)}>" if in_memory else str(item)))
        try:
            image = to_rgb(item) if in_memory else load_rgb(str(item))
        except UnreadableImageError as err:
            log.warning("skipping %s", err)
            out[-1].status = "unreadable"
            continue
        batch.append((len(out) - 1, transform(image)))
        if len(batch) == batch_size:
            _score_batch(learner, batch, device, top_k, out)
    _score_batch(learner, batch, device, top_k, out)
    return out


def _score_batch(learner: PromptLearner, batch: list[tuple[int, Any]], device: str, top_k: int,
                 out: list[Prediction]) -> None:
    """Score the ``(slot, pixels)`` of ``batch`` and fill their predictions in ``out``; empties ``batch``."""
    import torch

    from vlprompt.methods.scoring import prompt_logits

    if not batch:
        return
    names = list(learner.classnames)
    with torch.no_grad():
        pixels = torch.stack([t for _, t in batch]).to(device)
        probs = prompt_logits(learner(images=pixels), learner.backbone).softmax(-1).cpu()
    for (slot, _), p in zip(batch, probs):
        values, indices = p.topk(min(top_k, len(names)))
        best = int(indices[0])
        out[slot] = Prediction(out[slot].path, names[best], best, float(values[0]),
                               [(names[int(i)], float(v)) for v, i in zip(values, indices)])
    batch.clear()


def _write_atomically(path: Path, text: str) -> None:
    # A crash mid-write must not leave a truncated file that looks like results.
    handle, staging = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.replace(staging, path)
    finally:
        if os.path.exists(staging):
            os.unlink(staging)


def _refuse_overwrite(out: Path, overwrite: bool) -> None:
    existing = [name for name in OUTPUT_NAMES if (out / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{out} already holds {', '.join(existing)}; pass --overwrite or another --out")


def write_predictions(out: str | Path, predictions: Sequence[Prediction], summary: dict[str, Any] | None = None,
                      *, overwrite: bool = False) -> list[Path]:
    """Write ``predictions.csv`` (path, status, label, probability, top classes) and
    ``predictions.json`` (``{"summary": ..., "predictions": [...]}``) into ``out``. Refuses to
    replace earlier predictions unless ``overwrite``."""
    out = Path(out).expanduser()
    _refuse_overwrite(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    table = io.StringIO()
    writer = csv.writer(table)
    writer.writerow(["path", "status", "label", "probability", "top"])
    for p in predictions:
        writer.writerow([p.path, p.status, p.label, f"{p.probability:.5f}" if p.status == "ok" else "",
                         "; ".join(f"{name} {value:.5f}" for name, value in p.top)])
    _write_atomically(out / "predictions.csv", table.getvalue())
    document = {"summary": summary or {}, "predictions": [asdict(p) for p in predictions]}
    _write_atomically(out / "predictions.json", json.dumps(document, indent=1) + "\n")
    return [out / name for name in OUTPUT_NAMES]


def main(argv: list[str] | None = None) -> None:
    """``vlprompt classify`` / ``tools/classify.py``."""
    parser = CommandParser(prog="vlprompt classify", description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt", required=True, help="a saved prompt directory (config.json + prompt.safetensors)")
    parser.add_argument("--images", required=True, nargs="+", help="a folder (searched recursively) or image files")
    names = parser.add_mutually_exclusive_group()
    names.add_argument("--classnames", nargs="+", help="classify into these classes instead of the prompt's own")
    names.add_argument("--classnames_file", help="class names, one per line in label order")
    parser.add_argument("--out", default="outputs/classify", help="where predictions.csv / .json are written")
    parser.add_argument("--overwrite", action="store_true", help="replace predictions already in --out")
    parser.add_argument("--batch_size", type=int, default=32, help="images per forward pass")
    parser.add_argument("--top_k", type=int, default=5, help="most probable classes listed per image")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: CUDA when available)")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.top_k < 1:
        parser.error("--batch_size and --top_k must be at least 1")
    out = Path(args.out).expanduser()
    # Checked before the model is loaded: a refused or mistyped run costs nothing.
    _refuse_overwrite(out, args.overwrite)
    images = expand_image_inputs(args.images)
    from vlprompt.data.classnames import check_distinct_classnames, read_classnames_file

    classnames = args.classnames
    if classnames is not None:
        # As fit and tta do: two classes of one name would split the probability between them.
        check_distinct_classnames(classnames, "--classnames")
    if args.classnames_file:
        classnames = [name for _, name in read_classnames_file(args.classnames_file)]  # checked there
    from vlprompt.prompts import load_prompt

    learner = load_prompt(args.prompt, classnames=classnames)
    predictions = classify_images(learner, images, batch_size=args.batch_size, device=args.device, top_k=args.top_k)
    ok = [p for p in predictions if p.status == "ok"]
    summary = {
        "prompt": str(Path(args.prompt).expanduser()),
        "method": learner.name,
        "backbone": learner.backbone.identity.get("name"),
        "classnames": list(learner.classnames),
        "images": len(predictions),
        "classified": len(ok),
        "unreadable": [p.path for p in predictions if p.status != "ok"],
    }
    write_predictions(out, predictions, summary, overwrite=args.overwrite)
    log.info("%d images classified, %d unreadable skipped; predictions in %s", len(ok), len(predictions) - len(ok), out)
