"""Segmentation evaluation: the zero-shot vision-language segmentation model against text, visual
and multimodal prompt tuning of it (TuneVLSeg's comparison), Dice and IoU in one table, with
overlay pictures (image, ground truth, each method's prediction).

Driven by a YAML file in the project's config dialect (``configs/seg/shapeworld_demo.yaml``)::

    segmentation:
      backbone: {class_path: vlprompt.backbones.OpenCLIPBackbone, init_args: {model_name: zoo:shapeworld-clip-tiny}}
      data: {class_path: vlprompt.data.ShapeWorldSegmentationDataModule, init_args: {domain: negative}}
      decoder_weights: zoo:shapeworld-clip-tiny      # the VLSM's trained head, kept frozen
      zeroshot: true
      methods:
        coop: {config: ../methods/coop.yaml, model: {...}, trainer: {max_epochs: 5}}
        cris-coop:                                     # a method on another VLSM (VLSM_KEYS)
          backbone: {class_path: vlprompt.backbones.OpenCLIPBackbone, init_args: {model_name: zoo:shapeworld-cris-tiny}}
          decoder_weights: zoo:shapeworld-cris-tiny
          config: ../methods/coop.yaml
      overlays: 4
      trainer: {accelerator: cpu}

Writes ``results.csv``, ``summary.md`` and ``overlays.png`` into the output folder.
"""

from __future__ import annotations

import csv
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from PIL import Image

from vlprompt.apps.runner import TaskRunner, instantiate, method_recipe, prepare_output_dir, read_config
from vlprompt.methods import PromptSegmenter

__all__ = ["SegmentationEvalConfig", "format_table", "overlay_mask", "run_segmentation_eval", "save_overlays"]

log = logging.getLogger(__name__)

#: The scores of a row, in table order.
SCORES = ("dice_per_image", "iou_per_image", "dice_dataset", "iou_dataset")


@dataclass
class SegmentationEvalConfig:
    """What to run; see the module docstring for the YAML form."""

    backbone: dict[str, Any]
    data: dict[str, Any]
    methods: dict[str, dict[str, Any]]
    decoder_weights: str | None = None
    zeroshot: bool = True
    overlays: int = 4
    seed: int = 1
    trainer: dict[str, Any] = field(default_factory=dict)
    config_dir: Path | None = None

    @classmethod
    def read(cls, path: str | Path, overrides: Sequence[str] = ()) -> SegmentationEvalConfig:
        """Read the ``segmentation:`` section of a YAML file (unknown keys are an error)."""
        return read_config(cls, path, "segmentation", section="segmentation", overrides=overrides)


def format_table(rows: dict[str, dict[str, float]]) -> str:
    """Markdown table: one row per method, Dice and IoU per image and dataset-wide (%)."""
    lines = ["| method | Dice (per image) | IoU (per image) | Dice (dataset) | IoU (dataset) |", "|---|---|---|---|---|"]
    lines += [f"| {m} | " + " | ".join(f"{100 * s[k]:.1f}" for k in SCORES) + " |" for m, s in rows.items()]
    return "\n".join(lines)


def overlay_mask(image: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    """``image`` (``[H, W, 3]`` uint8) with the pixels of ``mask`` tinted ``colour``."""
    out = image.astype(np.float32).copy()
    out[mask] = 0.45 * out[mask] + 0.55 * np.asarray(colour, np.float32)
    return out.astype(np.uint8)


def save_overlays(models: dict[str, PromptSegmenter], dm: Any, count: int, path: Path) -> Path:
    """A grid: one row per test sample (its prompt in the title), columns image, ground truth and
    each method's prediction overlaid in colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dataset = dm.dataset("test")
    picks = [int(i) for i in np.linspace(0, len(dataset) - 1, count)] if count else []
    fig, axes = plt.subplots(len(picks), 2 + len(models), figsize=(2.1 * (2 + len(models)), 2.2 * len(picks)),
                             dpi=110, squeeze=False)
    for row, index in zip(axes, picks):
        item, sample = dataset[index], dataset.samples[index]
        image = np.asarray(Image.open(sample.image).convert("RGB"))
        truth = item["mask"][0].numpy() > 0.5
        truth = np.asarray(Image.fromarray(truth).resize(image.shape[1::-1], Image.NEAREST))
        panels = [("image", image), ("ground truth", overlay_mask(image, truth, (0, 200, 0)))]
        for name, model in models.items():
            with torch.no_grad():
                logits = model(item["image"][None].to(model.device), [item["prompt"]])
            pred = torch.nn.functional.interpolate(logits, size=image.shape[:2], mode="bilinear")[0, 0] > 0
            panels.append((name, overlay_mask(image, pred.cpu().numpy(), (230, 40, 40))))
        for ax, (title, picture) in zip(row, panels):
            ax.imshow(picture)
            ax.set_title(title if title != "image" else f'"{item["prompt"]}"', fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


#: Keys a method entry may add to run on another VLSM than the config's (CRIS beside CLIPSeg): its
#: ``backbone`` and its head's ``decoder_weights``; ``zeroshot: true`` for that VLSM as it is (no
#: ``config:``, nothing fitted).
VLSM_KEYS = ("backbone", "decoder_weights", "zeroshot")


def _fitted_models(cfg: SegmentationEvalConfig, runner: TaskRunner, dm: Any) -> dict[str, PromptSegmenter]:
    """Zero-shot (``cfg.zeroshot``) and each method, fitted on the config's VLSM or the one it names."""
    from tqdm.auto import tqdm

    runners = {"": runner}  # by backbone spec: each backbone is built once

    def runner_of(spec: dict[str, Any]) -> TaskRunner:
        key = repr(spec["backbone"]) if "backbone" in spec else ""
        if key not in runners:
            runners[key] = TaskRunner(spec["backbone"], cfg.trainer)
        return runners[key]

    models: dict[str, PromptSegmenter] = {}
    if cfg.zeroshot:
        models["zero-shot"] = PromptSegmenter(runner.backbone, decoder_weights=cfg.decoder_weights)
    for name, spec in tqdm(cfg.methods.items(), desc="methods", unit="method"):
        own, weights = runner_of(spec), spec.get("decoder_weights", cfg.decoder_weights)
        if spec.get("zeroshot"):
            models[name] = PromptSegmenter(own.backbone, decoder_weights=weights)
            continue
        recipe = method_recipe({k: v for k, v in spec.items() if k not in VLSM_KEYS}, cfg.config_dir,
                               module=PromptSegmenter)
        models[name] = own.fit(recipe, dm, cfg.seed, decoder_weights=weights)
    return models


def run_segmentation_eval(cfg: SegmentationEvalConfig, output_dir: str | Path, *, overwrite: bool = False
                          ) -> dict[str, dict[str, float]]:
    """Zero-shot and every configured method on the data's test split; writes the table, the raw
    scores and the overlays. Returns ``method -> scores`` (fractions)."""
    output_dir = prepare_output_dir(output_dir, "results.csv", overwrite)
    started = time.perf_counter()
    runner = TaskRunner(cfg.backbone, cfg.trainer)
    dm = instantiate(pl.LightningDataModule, cfg.data)
    models = _fitted_models(cfg, runner, dm)
    rows = {}
    for name, model in models.items():
        runner.trainer().test(model, datamodule=dm, verbose=False)
        rows[name] = dict(model.test_results)
        log.info("%s: %s", name, ", ".join(f"{k} {100 * v:.1f}" for k, v in rows[name].items()))
    with (output_dir / "results.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["method", *SCORES])
        writer.writerows([m, *(f"{s[k]:.4f}" for k in SCORES)] for m, s in rows.items())
    (output_dir / "summary.md").write_text(
        f"# Segmentation ({time.perf_counter() - started:.0f} s)\n\n{format_table(rows)}\n")
    if cfg.overlays:
        save_overlays(models, dm, cfg.overlays, output_dir / "overlays.png")
    return rows
