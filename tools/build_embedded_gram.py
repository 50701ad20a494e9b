#!/usr/bin/env python
"""Meta-train the embedded GRAM meta-prompts: CoOp and VPT prompt initialisations with their
gradient regulators, learned on ``shapeworld-clip-tiny`` from unlabelled ShapeWorld image-caption
pairs (no class labels), so that the GRAM demo runs offline.

Writes ``gram-coop/`` and ``gram-vpt/`` (saved prompts with ``regulator.safetensors``) and
``GRAM_BUILD.json`` (arguments, tensor hashes, versions, time) next to the CLIP model, where
``init_prompt: zoo:shapeworld-clip-tiny/gram-coop`` and
``GradientRegulation(meta_prompt="zoo:shapeworld-clip-tiny/gram-coop")`` find them.

Deterministic (seeded pairs, clustering, episodes and init; deterministic algorithms; fixed thread
count): on the same machine and software it reproduces the files bit for bit, which ``--check``
verifies (on the tensors).

    python tools/build_embedded_gram.py            # about 5 minutes on 2 CPU cores
    python tools/build_embedded_gram.py --check
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

from vlprompt.backbones import OpenCLIPBackbone  # noqa: E402
from vlprompt.data import ImageTextPairsDataModule  # noqa: E402
from vlprompt.data.world import write_caption_dataset  # noqa: E402
from vlprompt.methods import GRAMMetaLearner  # noqa: E402
from vlprompt.prompts import CoOpPromptLearner, VPTPromptLearner  # noqa: E402
from vlprompt.zoo import model_dir, tensors_sha256  # noqa: E402

log = logging.getLogger("build_embedded_gram")

BUILD_FILE = "GRAM_BUILD.json"
#: The learners of the demo (configs/eval/shapeworld_gram.yaml): the meta-prompts must match them.
LEARNERS = {
    "gram-coop": functools.partial(CoOpPromptLearner, n_ctx=4),
    "gram-vpt": functools.partial(VPTPromptLearner, n_tokens=8, depth=None, templates="photo"),
}


def _hash(folder: Path) -> dict[str, str]:
    return {p.name: tensors_sha256(p) for p in sorted(folder.glob("*.safetensors"))}


def build(out: Path, args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    backbone = OpenCLIPBackbone("zoo:shapeworld-clip-tiny")
    record: dict = {"model": "shapeworld-clip-tiny", "command": ["tools/build_embedded_gram.py"], "args": vars(args),
                    "prompts": {}}
    with tempfile.TemporaryDirectory() as tmp:
        pairs = write_caption_dataset(Path(tmp) / "pairs", args.pairs, seed=args.seed)
        for name, factory in LEARNERS.items():
            pl.seed_everything(args.seed, workers=True)
            model = GRAMMetaLearner(backbone, factory, n_way=args.ways, k_shot=args.shots, q_query=args.queries,
                                    n_domains=args.domains, classes_per_domain=args.classes_per_domain,
                                    min_class_size=max(args.shots, args.queries), inner_steps=args.inner_steps,
                                    inner_lr=args.inner_lr, outer_lr=args.outer_lr, regulator_lr=args.regulator_lr,
                                    seed=args.seed)
            dm = ImageTextPairsDataModule(str(pairs), episodes_per_epoch=args.episodes, episodes_per_batch=args.batch,
                                          num_workers=0)
            pl.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                       enable_model_summary=False, deterministic=True).fit(model, datamodule=dm)
            folder = model.save_meta_prompt(out / name, overwrite=True)
            record["prompts"][name] = {"sha256": _hash(folder), "classes": len(model.sampler.hierarchy.classnames),
                                       "regulator_gate": round(float(torch.sigmoid(model.regulator.gate)), 4)}
    record.update(seconds=round(time.perf_counter() - started),
                  versions={"python": platform.python_version(), "torch": torch.__version__,
                            "lightning": pl.__version__})
    (out / BUILD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    log.info("meta-prompts written to %s in %d s", out, record["seconds"])
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=4096, help="image-caption pairs generated for meta-training")
    parser.add_argument("--domains", type=int, default=4)
    parser.add_argument("--classes-per-domain", type=int, default=12)
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=2)
    parser.add_argument("--queries", type=int, default=8)
    parser.add_argument("--inner-steps", type=int, default=5)
    parser.add_argument("--inner-lr", type=float, default=0.5)
    parser.add_argument("--outer-lr", type=float, default=2e-3)
    parser.add_argument("--regulator-lr", type=float, default=1e-3)
    parser.add_argument("--episodes", type=int, default=200, help="episodes per epoch")
    parser.add_argument("--batch", type=int, default=4, help="episodes per meta-step")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=model_dir("shapeworld-clip-tiny"))
    parser.add_argument("--check", action="store_true", help="rebuild elsewhere and compare the tensor hashes")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.use_deterministic_algorithms(True)
    if args.check:
        expected = {k: v["sha256"] for k, v in json.loads((args.out / BUILD_FILE).read_text())["prompts"].items()}
        with tempfile.TemporaryDirectory() as tmp:
            got = build(Path(tmp), argparse.Namespace(**{**vars(args), "check": False, "out": tmp}))
        same = {k: v["sha256"] for k, v in got["prompts"].items()} == expected
        log.info("rebuilt meta-prompts %s the shipped ones", "match" if same else "DIFFER from")
        raise SystemExit(0 if same else 1)
    out = Path(args.out).resolve()
    shown = str(out.relative_to(REPO)) if out.is_relative_to(REPO) else str(out)
    build(out, argparse.Namespace(**{**vars(args), "out": shown}))


if __name__ == "__main__":
    main()
