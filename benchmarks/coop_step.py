"""One CoOp training step: plain (full context, image tower every step) vs vlprompt
(exact causal truncation + cached image features), on a random ViT-B-16-sized open_clip model.

Both variants run in this process on the same model, classes and batch; the script prints the
median step time of each and their ratio, and checks that both give the same loss.

    python benchmarks/coop_step.py                     # ViT-B-16, 100 classes, batch 32
    python benchmarks/coop_step.py --device cuda --precision bf16
"""

from __future__ import annotations

import argparse
import logging

import torch
import torch.nn.functional as F
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

from timing import timed
from vlprompt.backbones import OpenCLIPBackbone
from vlprompt.prompts import CoOpPromptLearner

log = logging.getLogger("benchmarks.coop_step")


def step(learner, backbone, images, labels, image_features, optimizer, autocast) -> float:
    with autocast():
        feats = image_features if image_features is not None else learner.encode_images(images)
        text = learner.text_features()
        logits = backbone.logit_scale * F.normalize(feats.float(), dim=-1) @ F.normalize(text.float(), dim=-1).t()
        loss = F.cross_entropy(logits, labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--n-ctx", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device(args.device)
    torch.manual_seed(0)

    backbone = OpenCLIPBackbone(args.model, pretrained=None).to(device)
    names = list(IMAGENET_CLASSNAMES[: args.classes])
    size = backbone.preprocess_cfg["size"]
    size = size if isinstance(size, int) else size[0]
    images = torch.randn(args.batch_size, 3, size, size, device=device)
    labels = torch.randint(0, args.classes, (args.batch_size,), device=device)
    dtype = torch.bfloat16 if args.precision == "bf16" else None

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    def make(truncate: bool):
        backbone.truncate_text = truncate
        torch.manual_seed(1)
        learner = CoOpPromptLearner(backbone, names, n_ctx=args.n_ctx).to(device)
        return learner, torch.optim.SGD(learner.parameters(), lr=0.002, momentum=0.9)

    learner, opt = make(truncate=False)
    log.info("%s, %d classes, batch %d, %d context tokens, %s on %s", args.model, args.classes, args.batch_size,
             args.n_ctx, args.precision, device)
    plain_time, plain_loss = timed(lambda: step(learner, backbone, images, labels, None, opt, autocast), args.repeats, device)
    log.info("plain    (context %d, image tower every step): %.3f s/step", backbone.context_length, plain_time)

    learner, opt = make(truncate=True)
    with torch.no_grad(), autocast():
        cached = learner.encode_images(images)  # computed once, reused every epoch
    fast_time, fast_loss = timed(lambda: step(learner, backbone, images, labels, cached, opt, autocast), args.repeats, device)
    used = backbone.text_length_needed(learner.token_ids)
    log.info("vlprompt (context %d of %d, cached image features): %.3f s/step", used, backbone.context_length, fast_time)
    log.info("speed-up: %.1fx  (losses after the same steps: plain %.5f, vlprompt %.5f)", plain_time / fast_time, plain_loss, fast_loss)


if __name__ == "__main__":
    main()
