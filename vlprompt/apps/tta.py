"""``vlprompt tta``: test-time prompt tuning (TPT or DiffTPT) on a folder of images or a dataset.

Writes ``predictions.csv`` and ``predictions.json`` (per image: the class predicted after
adaptation and its confidence, the prediction of the starting prompt, and the label when the
folder names it), a summary with the accuracies when labels are known, and optionally pictures of
the views of a few images (``views/``). ``--generate_views_only`` fills DiffTPT's view cache for
the data and stops: the command that pre-generates the cache for a dataset.

Examples::

    vlprompt tta --config configs/backbones/shapeworld_tiny.yaml --config configs/tta/tpt.yaml \\
        --images path/to/images --classnames_file classes.txt --out outputs/tta
    vlprompt tta --config configs/eval/shapeworld_tta.yaml --model.class_path vlprompt.methods.DiffTPT ...
"""

from __future__ import annotations

import csv
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch.cli import LightningCLI

from vlprompt.apps.runner import config_files, read_yaml, refuse_duplicate_keys
from vlprompt.data.images import UnreadableImageError, load_rgb
from vlprompt.data.test_images import UNLABELLED
from vlprompt.methods import DiffTPT, TestTimePromptTuning

__all__ = ["TTACLI", "main", "run_predictions", "run_tta", "write_predictions"]

log = logging.getLogger(__name__)

_OUTPUTS = ("predictions.csv", "predictions.json")


class TTACLI(LightningCLI):
    """LightningCLI over :class:`TestTimePromptTuning` and its subclasses (``--model.class_path
    vlprompt.methods.DiffTPT``) with the data from ``--images`` or ``--data``."""

    def init_parser(self, **kwargs):
        # Parse errors are raised (``vlprompt`` prints them as one line) instead of printing the usage.
        kwargs.setdefault("prog", "vlprompt tta")
        kwargs.setdefault("exit_on_error", False)
        return super().init_parser(**kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.classnames", "model.init_args.classnames", apply_on="instantiate")
        parser.add_argument("--images", type=str | None, default=None,
                            help="Folder of images: root/<class>/* (labels known) or root/* (unlabelled).")
        parser.add_argument("--classnames", type=str, nargs="+", default=None,
                            help="Class names, for --images: --classnames cat dog 'golden retriever'.")
        parser.add_argument("--classnames_file", type=str | None, default=None,
                            help="Class names, one per line in label order (or '<folder> <name>' lines), for --images.")
        parser.add_argument("--out", type=str, default="outputs/tta", help="Where predictions are written.")
        parser.add_argument("--overwrite", type=bool, default=False, help="Replace predictions already in --out.")
        parser.add_argument("--pictures", type=int, default=4, help="Save a picture of the views of this many images.")
        parser.add_argument("--generate_views_only", type=bool, default=False,
                            help="DiffTPT: fill the view cache for the data, then stop.")
        parser.add_argument("--generate_batch_images", type=int, default=8,
                            help="Test images per generation call with --generate_views_only.")
        parser.set_defaults({
            "trainer.inference_mode": False,  # TPT takes gradient steps at test time
            "trainer.logger": False,
            "trainer.enable_checkpointing": False,
            "trainer.enable_model_summary": False,
        })

    def before_instantiate_classes(self) -> None:
        config = self.config
        if config.get("images") is None:
            if config.get("data") is None:
                raise ValueError("give the images to classify: --images DIR (with class names) or --data CONFIG")
            return
        if config.get("data") is not None:
            raise ValueError("give --images or --data, not both")
        config["data"] = Namespace(
            class_path="vlprompt.data.TestImagesDataModule",
            init_args=Namespace(root=config["images"], classnames=config.get("classnames"),
                                classnames_file=config.get("classnames_file"), batch_size=1, num_workers=0,
                                on_error="skip"),
        )


def generate_views(model: DiffTPT, datamodule, batch_images: int) -> None:
    """Fill ``model``'s view cache for every readable image of the data's test split."""
    from tqdm.auto import tqdm

    datamodule.setup("predict")
    samples, skipped = datamodule.datasets["test"].samples, 0

    def images():
        nonlocal skipped
        for sample in tqdm(samples, desc="generating views", unit="image"):
            try:
                yield load_rgb(sample.path)
            except UnreadableImageError as err:
                skipped += 1
                log.warning("skipping %s", err)

    model.cache.pregenerate(images(), batch_images=batch_images)
    log.info("view cache %s: %d images already there, %d generated, %d unreadable skipped",
             model.cache.root, model.cache.hits, model.cache.misses, skipped)


def write_predictions(out: Path, samples: list, classnames: list[str], outputs: list[dict[str, Any] | None],
                      summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Write ``predictions.csv`` / ``.json`` and return the rows; fills the accuracies in
    ``summary``. Images that produced no prediction (unreadable) are listed as skipped."""
    done: dict[int, dict[str, Any]] = {}
    for batch in outputs:
        if batch is None:
            continue
        for j, index in enumerate(batch["index"].tolist()):
            done[index] = {k: batch[k][j] for k in ("prediction", "confidence", "start_prediction", "start_confidence")}
    rows: list[dict[str, Any]] = []
    scored: list[tuple[bool, bool]] = []  # (adapted correct, starting prompt correct) per labelled image
    for index, sample in enumerate(samples):
        row: dict[str, Any] = {"path": sample.path, "label": sample.classname if sample.label != UNLABELLED else ""}
        result = done.get(index)
        if result is None:
            row |= {"status": "unreadable", "prediction": "", "confidence": "", "start_prediction": "",
                    "start_confidence": "", "correct": ""}
        else:
            pred, start = int(result["prediction"]), int(result["start_prediction"])
            row |= {
                "status": "ok",
                "prediction": classnames[pred],
                "confidence": round(float(result["confidence"]), 5),
                "start_prediction": classnames[start],
                "start_confidence": round(float(result["start_confidence"]), 5),
                "correct": "" if sample.label == UNLABELLED else int(pred == sample.label),
            }
            if sample.label != UNLABELLED:
                scored.append((pred == sample.label, start == sample.label))
        rows.append(row)
    summary["predicted"] = sum(r["status"] == "ok" for r in rows)
    summary["skipped"] = [r["path"] for r in rows if r["status"] != "ok"]
    summary["labelled"] = len(scored)
    if scored:
        summary["accuracy"] = round(100.0 * sum(a for a, _ in scored) / len(scored), 2)
        summary["start_accuracy"] = round(100.0 * sum(b for _, b in scored) / len(scored), 2)
    out.mkdir(parents=True, exist_ok=True)
    fields = ["path", "status", "prediction", "confidence", "start_prediction", "start_confidence", "label", "correct"]
    with open(out / "predictions.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    (out / "predictions.json").write_text(json.dumps({"summary": summary, "predictions": rows}, indent=1) + "\n")
    return rows


def save_view_pictures(model: TestTimePromptTuning, samples: list, outputs: list[dict[str, Any] | None],
                       classnames: list[str], out: Path, count: int) -> list[Path]:
    """Pictures of the views of the first ``count`` predicted images, kept views outlined."""
    from vlprompt.eval.plots import plot_views

    transform = model.view_transform()
    n_conventional = model.n_views
    saved = []
    for batch in outputs:
        if batch is None:
            continue
        for j, index in enumerate(batch["index"].tolist()):
            if len(saved) == count:
                return saved
            sample = samples[index]
            views = transform(load_rgb(sample.path))
            title = (f"{Path(sample.path).name}: {classnames[int(batch['start_prediction'][j])]} -> "
                     f"{classnames[int(batch['prediction'][j])]} ({float(batch['confidence'][j]):.2f})"
                     + (f", label {sample.classname}" if sample.label != UNLABELLED else ""))
            path = out / "views" / f"{index:05d}_{Path(sample.path).stem}.png"
            plot_views(views, model.backbone.preprocess_cfg, batch["kept"][j].tolist(), n_conventional, title, path)
            saved.append(path)
    return saved


def run_tta(argv: list[str] | None = None) -> dict[str, Any] | None:
    """Parse ``vlprompt tta`` arguments and run; returns the summary of the run (None with
    ``--generate_views_only``)."""
    refuse_duplicate_keys()
    for path in config_files(sys.argv[1:] if argv is None else argv):
        read_yaml(path)  # a key given twice is refused with the file's name (jsonargparse would not say which)
    cli = TTACLI(TestTimePromptTuning, subclass_mode_model=True, subclass_mode_data=True, run=False, args=argv,
                 save_config_callback=None, auto_configure_optimizers=False)
    model, datamodule, trainer, config = cli.model, cli.datamodule, cli.trainer, cli.config
    if config["generate_views_only"]:
        if not isinstance(model, DiffTPT):
            raise ValueError("--generate_views_only needs --model.class_path vlprompt.methods.DiffTPT (a view generator)")
        generate_views(model, datamodule, config["generate_batch_images"])
        return None
    return run_predictions(model, datamodule, trainer, Path(config["out"]).expanduser(), pictures=config["pictures"],
                           overwrite=config["overwrite"], seed=config.get("seed_everything"))


def main(argv: list[str] | None = None) -> None:
    """``vlprompt tta`` / ``tools/tta.py`` (a console entry point: returns nothing, so the exit
    status is 0 on success)."""
    run_tta(argv)


def run_predictions(model: TestTimePromptTuning, datamodule: Any, trainer: Any, out: Path, *, pictures: int = 4,
                    overwrite: bool = False, seed: int | bool | None = None) -> dict[str, Any]:
    """Adapt and predict every image of the data module's test split, write ``predictions.csv`` /
    ``.json`` (and view pictures of the first ``pictures`` images) into ``out``; returns the summary
    (with ``seed``, the run's random seed, when given). Refuses to replace earlier predictions
    unless ``overwrite``."""
    existing = [name for name in _OUTPUTS if (out / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{out} already holds {existing}; pass --overwrite true or another --out")
    start = time.time()
    outputs = trainer.predict(model, datamodule=datamodule)
    seconds = time.time() - start
    samples = datamodule.dataset("test").samples
    summary: dict[str, Any] = {
        "method": type(model).__name__,
        "learner": model.prompt_learner.name,
        "images": len(samples),
        "classnames": model.prompt_learner.classnames,
        "seconds": round(seconds, 2),
        "seconds_per_image": round(seconds / max(1, len(samples)), 4),
        "settings": {k: v for k, v in dict(model.hparams).items()
                     if not k.startswith("_") and isinstance(v, (int, float, str, bool, type(None)))},
    }
    if seed is not None and seed is not False:
        summary["seed"] = seed  # views are random: the seed reproduces the run
    summary["unadapted_nonfinite_loss"] = model.unadapted_images
    if isinstance(model, DiffTPT):
        summary["view_cache"] = {"root": str(model.cache.root), "read": model.cache.hits, "generated": model.cache.misses}
    write_predictions(out, samples, model.prompt_learner.classnames, outputs, summary)
    if pictures > 0:
        save_view_pictures(model, samples, outputs, model.prompt_learner.classnames, out, pictures)
    line = f"{summary['predicted']} images classified in {seconds:.1f} s"
    if "accuracy" in summary:
        line += f"; accuracy {summary['accuracy']:.1f}% (starting prompt {summary['start_accuracy']:.1f}%)"
    if summary["skipped"]:
        line += f"; {len(summary['skipped'])} unreadable images skipped"
    log.info("%s; predictions in %s", line, out)
    return summary
