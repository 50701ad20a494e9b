"""``vlprompt segment``: segment a folder of your images with text prompts, writing one mask PNG
and one overlay per (image, prompt), at the image's own size, and ``segments.csv``.

The model is a backbone with a segmentation head: CLIPSeg's own through transformers
(``--backbone hf:CIDAS/clipseg-rd64-refined`` or ``hf:/a/local/folder``), or vlprompt's CLIPSeg-style
head over an open_clip model (``--decoder``: a weights file or ``zoo:NAME``); and, optionally, a prompt tuned with ``vlprompt fit`` on segmentation data (``--prompt``: a saved
prompt folder); without one, the text is used as it is (zero-shot).

    vlprompt segment --images photos/ --text "red star" "blue circle" --out outputs/segment
    vlprompt segment --images photos/ --text "a cat" --backbone hf:/models/clipseg-rd64-refined
"""

from __future__ import annotations

import csv
import logging
import re
from pathlib import Path
from typing import Any

from vlprompt.apps.runner import CommandParser, expand_image_inputs

__all__ = ["main", "segment_images"]

log = logging.getLogger(__name__)

_OUTPUTS = ("segments.csv",)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "prompt"


def _check_request(texts: list[str], out: Path, threshold: float, overwrite: bool) -> None:
    if not 0 < threshold < 1:
        raise ValueError(f"--threshold must be between 0 and 1, got {threshold}")
    if any(not t.strip() for t in texts):
        raise ValueError("empty text prompt")
    existing = [name for name in _OUTPUTS if (out / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{out} already holds {existing}; pass --overwrite or another --out")


#: The backbone (and head) without --backbone or a saved prompt: the embedded CLIP.
DEFAULT_BACKBONE = "zoo:shapeworld-clip-tiny"


def _recorded_backbone_name(prompt: str) -> str:
    """The name of the backbone a saved prompt was learned on (``hf:`` for Hugging Face models)."""
    from vlprompt.prompts.io import read_prompt_config

    identity = read_prompt_config(prompt)["backbone"]
    name = str(identity.get("name", ""))
    return f"hf:{name}" if identity.get("type", "").startswith("HF") and not name.startswith("hf:") else name


def _build_segmenter(backbone: str | None, pretrained: str | None, decoder: str | None, prompt: str | None,
                     device: str) -> Any:
    """The segmenter: the backbone (None: the one the saved ``prompt`` records), with the saved
    ``prompt`` if any (refused when learned on another backbone) and its head: the one a prompt was
    saved with (another ``decoder`` is refused) or ``decoder``."""
    from vlprompt.backbones import load_backbone
    from vlprompt.methods import PromptSegmenter
    from vlprompt.methods.segmentation import prompt_head
    from vlprompt.prompts import load_prompt
    from vlprompt.prompts.io import backbone_from_identity, read_prompt_config

    saved_head = prompt_head(prompt)
    if saved_head is not None:
        # The prompt was tuned with this head; with any other one its masks would be wrong.
        if decoder is not None and Path(decoder).expanduser().resolve() != saved_head.resolve():
            raise ValueError(f"--prompt {prompt} holds the head it was trained with ({saved_head}); --decoder "
                             f"{decoder} would replace it: leave --decoder out")
        decoder = str(saved_head)
    if backbone is None and prompt is not None:
        model_backbone = backbone_from_identity(read_prompt_config(prompt)["backbone"])
    else:
        model_backbone = load_backbone(backbone or DEFAULT_BACKBONE, pretrained)
    factory = None
    if prompt is not None:
        saved = load_prompt(prompt, model_backbone)  # refuses a prompt learned on another backbone
        factory = lambda b, names: saved  # noqa: E731 - the saved learner, pointed at each batch's texts
    # init_prompt: the settings and trained parts saved with the prompt (new last layer, carried visual prompts)
    return PromptSegmenter(model_backbone, factory, decoder_weights=decoder, init_prompt=prompt).to(device).eval()


def _segment_one(model: Any, transform: Any, image: Any, path: Path, texts: list[str], out: Path, threshold: float,
                 device: str) -> list[dict[str, object]]:
    """Masks and overlays of one image for every text, written under ``out``; their rows."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from PIL import Image

    from vlprompt.apps.segmentation import overlay_mask

    pixels = transform(image)[None].repeat(len(texts), 1, 1, 1).to(device)
    with torch.no_grad():
        probs = F.interpolate(model(pixels, texts), size=(image.height, image.width), mode="bilinear").sigmoid()
    picture, rows = np.asarray(image), []
    for text, prob in zip(texts, probs[:, 0].cpu().numpy()):
        mask = prob > threshold
        name = f"{path.stem}__{_slug(text)}.png"
        Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(out / "masks" / name)
        Image.fromarray(overlay_mask(picture, mask, (230, 40, 40))).save(out / "overlays" / name)
        rows.append({"image": str(path), "text": text, "status": "ok", "mask": str(out / "masks" / name),
                     "overlay": str(out / "overlays" / name), "foreground": round(float(mask.mean()), 4)})
    return rows


def segment_images(images: list[Path], texts: list[str], out: Path, *, backbone: str | None, pretrained: str | None,
                   decoder: str | None, prompt: str | None, threshold: float = 0.5, device: str | None = None,
                   overwrite: bool = False) -> list[dict[str, object]]:
    """Segment every image for every text; returns one row per (image, text): paths written,
    foreground share, status (``ok`` or ``unreadable``). ``backbone`` None: the one a saved
    ``prompt`` records, else the embedded CLIP. A ``prompt`` saved with its trained head brings
    that head; another ``decoder`` with it is refused."""
    import torch
    from tqdm.auto import tqdm

    from vlprompt.data.images import UnreadableImageError, build_eval_transform, load_rgb

    _check_request(texts, out, threshold, overwrite)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = _build_segmenter(backbone, pretrained, decoder, prompt, device)
    transform = build_eval_transform({**model.backbone.preprocess_cfg, "resize_mode": "squash"})
    (out / "masks").mkdir(parents=True, exist_ok=True)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, object]] = []
    for path in tqdm(images, desc="segmenting", unit="image"):
        try:
            image = load_rgb(str(path))
        except UnreadableImageError as err:
            log.warning("skipping %s", err)
            rows += [{"image": str(path), "text": t, "status": "unreadable"} for t in texts]
            continue
        rows += _segment_one(model, transform, image, path, texts, out, threshold, device)
    with (out / "segments.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["image", "text", "status", "mask", "overlay", "foreground"])
        writer.writeheader()
        writer.writerows(rows)
    skipped = sum(r["status"] != "ok" for r in rows) // max(1, len(texts))
    log.info("%d images segmented for %d prompts, %d unreadable skipped; masks and overlays in %s",
             len(images) - skipped, len(texts), skipped, out)
    return rows


def main(argv: list[str] | None = None) -> None:
    """``vlprompt segment`` / ``tools/segment.py``."""
    parser = CommandParser(prog="vlprompt segment", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", required=True, nargs="+", help="a folder (searched recursively) or image files")
    parser.add_argument("--text", required=True, nargs="+", help="what to segment, one or more prompts")
    parser.add_argument("--out", default="outputs/segment", help="where masks/, overlays/ and segments.csv go")
    parser.add_argument("--backbone", default=None,
                        help="open_clip model name, local-dir:FOLDER or zoo:NAME; hf:ID_OR_FOLDER for CLIPSeg (transformers) "
                             f"(default: the one --prompt was learned on, else {DEFAULT_BACKBONE})")
    parser.add_argument("--pretrained", default=None, help="the backbone's pretrained tag or checkpoint file")
    parser.add_argument("--decoder", default=None,
                        help="the segmentation head: a safetensors file or zoo:NAME (default: the head saved with "
                             "--prompt, which no other may replace; else CLIPSeg's own for hf: backbones, the head shipped "
                             "with a zoo: backbone (CLIPSeg-style or CRIS), else zoo:shapeworld-clip-tiny's)")
    parser.add_argument("--prompt", default=None, help="a saved prompt tuned for segmentation (default: zero-shot)")
    parser.add_argument("--threshold", type=float, default=0.5, help="mask probability threshold")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: CUDA when available)")
    parser.add_argument("--overwrite", action="store_true", help="replace the results already in --out")
    args = parser.parse_args(argv)
    out = Path(args.out).expanduser()
    if any((out / name).exists() for name in _OUTPUTS) and not args.overwrite:
        parser.error(f"{out} already holds segments.csv; pass --overwrite or another --out")

    images = [Path(p) for p in expand_image_inputs(args.images)]
    from vlprompt.methods.segmentation import prompt_head

    decoder = args.decoder
    name = args.backbone or (_recorded_backbone_name(args.prompt) if args.prompt else DEFAULT_BACKBONE)
    if decoder is None and prompt_head(args.prompt) is None and not name.startswith("hf:"):
        # an embedded model's own head (CLIPSeg-style or CRIS); a prompt's own head is picked up by segment_images
        decoder = name if name.startswith("zoo:") else DEFAULT_BACKBONE
    segment_images(images, args.text, out, backbone=args.backbone, pretrained=args.pretrained, decoder=decoder,
                   prompt=args.prompt, threshold=args.threshold, device=args.device, overwrite=args.overwrite)
