"""Per-image latency of test-time prompt tuning, and the cost of diffusion views cold vs cached.

1. TPT on one image (64 views, one step, 200 classes (``--classes 200 1000`` for several), random
   ViT-B-16-sized open_clip model), time and (on CUDA) peak memory per image:
   *plain*, the way the reference code runs it (full 77-token text context, the image tower
   re-run over all views for selection, for every step and for the final prediction), against
   *vlprompt*'s ``TestTimePromptTuning`` (all views in one batch encoded once, exact causal
   truncation of the text, text features once per step). Both start from the same prompt; the
   script checks they predict the same class.
2. DiffTPT's view generation with the embedded diffusion model: generating views for a few
   images with an empty cache (cold) against reading them back (warm).

Every figure is measured in this run; the script prints ratios.

    python benchmarks/tpt_latency.py                       # CPU
    python benchmarks/tpt_latency.py --device cuda --precision bf16
"""

from __future__ import annotations

import argparse
import functools
import logging
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

from timing import add_json_argument, peak_memory_mib, reset_peak_memory, timed, write_json
from vlprompt.backbones import OpenCLIPBackbone
from vlprompt.methods import TestTimePromptTuning
from vlprompt.prompts import CoOpPromptLearner
from vlprompt.tta import SDEditGenerator, ViewCache, confident_views, marginal_entropy

log = logging.getLogger("benchmarks.tpt_latency")


def plain_tpt(learner: CoOpPromptLearner, backbone: OpenCLIPBackbone, views: torch.Tensor, steps: int,
              ratio: float, autocast) -> int:
    """TPT as the reference code runs it: image features recomputed for every forward."""
    optimizer = torch.optim.AdamW([p for p in learner.parameters() if p.requires_grad], lr=5e-3)

    def logits(images: torch.Tensor) -> torch.Tensor:
        with autocast():
            with torch.no_grad():
                image = F.normalize(backbone.encode_image(images).float(), dim=-1)
            text = F.normalize(learner.text_features().float(), dim=-1)
        return backbone.logit_scale * image @ text.t()

    keep = None
    for _ in range(steps):
        output = logits(views)
        if keep is None:
            keep = confident_views(output.detach(), ratio)
        loss = marginal_entropy(output[keep])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return int(logits(views[:1]).argmax())


def tpt_latency(args: argparse.Namespace, device: torch.device, classes: int) -> list[dict]:
    torch.manual_seed(0)
    backbone = OpenCLIPBackbone(args.model, pretrained=None).to(device)
    names = list(IMAGENET_CLASSNAMES[:classes])
    size = backbone.preprocess_cfg["size"]
    size = size if isinstance(size, int) else size[0]
    views = torch.randn(args.views, 3, size, size, device=device)
    dtype = torch.bfloat16 if args.precision == "bf16" else None
    autocast = functools.partial(torch.autocast, device.type, dtype=dtype, enabled=dtype is not None)
    factory = functools.partial(CoOpPromptLearner, n_ctx=4, ctx_init="a photo of a")
    log.info("TPT: %s, %d classes, %d views, %d step(s), %s on %s", args.model, classes, args.views, args.steps,
             args.precision, device)

    backbone.truncate_text = False
    learner = factory(backbone, names).to(device)
    start_state = {k: v.clone() for k, v in learner.state_dict().items()}

    def run_plain() -> int:
        learner.load_state_dict(start_state)  # each image starts from the same prompt
        return plain_tpt(learner, backbone, views, args.steps, 0.1, autocast)

    reset_peak_memory(device)
    plain_time, plain_pred = timed(run_plain, args.repeats, device)
    plain_peak = peak_memory_mib(device)
    log.info("plain    (context %d, image tower every forward): %.3f s/image", backbone.context_length, plain_time)
    del learner, start_state

    backbone.truncate_text = True
    model = TestTimePromptTuning(backbone, factory, names, n_views=args.views, steps=args.steps).to(device)

    def run_vlprompt() -> int:
        with autocast():
            return int(model.adapt_and_predict(views).argmax())

    reset_peak_memory(device)
    fast_time, fast_pred = timed(run_vlprompt, args.repeats, device)
    fast_peak = peak_memory_mib(device)
    used = backbone.text_length_needed(model.prompt_learner.token_ids)
    log.info("vlprompt (context %d of %d, view features once):  %.3f s/image", used, backbone.context_length, fast_time)
    log.info("TPT speed-up: %.1fx  (predicted class: plain %d, vlprompt %d)", plain_time / fast_time, plain_pred, fast_pred)
    if plain_peak is not None:
        log.info("peak memory per image: plain %.0f MiB, vlprompt %.0f MiB", plain_peak, fast_peak)
    return [{"classes": classes, "variant": "plain", "seconds": plain_time, "peak_mib": plain_peak,
             "context": backbone.context_length, "prediction": plain_pred},
            {"classes": classes, "variant": "vlprompt", "seconds": fast_time, "peak_mib": fast_peak, "context": used,
             "prediction": fast_pred}]


def generation_cost(args: argparse.Namespace, device: torch.device) -> dict:
    from vlprompt.data.world import CLASSNAMES, class_spec, render, sample_spec

    images = []
    for i in range(args.gen_images):
        rng = np.random.default_rng([0, 9, i])
        spec = sample_spec(rng, combos=[class_spec(CLASSNAMES[i % len(CLASSNAMES)])])
        images.append(render(spec, rng, domain="shifted"))
    generator = SDEditGenerator("zoo:shapeworld-ddpm-tiny", n_views=args.gen_views, steps=10, strength=0.5,
                                device=str(device))
    with tempfile.TemporaryDirectory() as root:
        cold_start = time.perf_counter()
        ViewCache(generator, root).pregenerate(images)
        cold = time.perf_counter() - cold_start
        warm_cache = ViewCache(generator, root)
        warm_start = time.perf_counter()
        warm_cache.pregenerate(images)
        warm = time.perf_counter() - warm_start
    assert warm_cache.misses == 0
    log.info("DiffTPT views (embedded DDPM, %d views/image, strength 0.5, 10 steps, %d images) on %s:",
             args.gen_views, args.gen_images, device)
    log.info("cold cache (generate + store): %.3f s/image; warm cache (read): %.4f s/image; ratio %.0fx",
             cold / args.gen_images, warm / args.gen_images, cold / warm)
    return {"variant": "difftpt-views", "cold_seconds_per_image": cold / args.gen_images,
            "warm_seconds_per_image": warm / args.gen_images, "views_per_image": args.gen_views}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--classes", type=int, nargs="+", default=[200])
    parser.add_argument("--views", type=int, default=64)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--gen-images", type=int, default=8)
    parser.add_argument("--gen-views", type=int, default=32)
    parser.add_argument("--skip-tpt", action="store_true")
    add_json_argument(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device(args.device)
    rows = [] if args.skip_tpt else [row for classes in args.classes for row in tpt_latency(args, device, classes)]
    rows.append(generation_cost(args, device))
    write_json(args.json, "tpt_latency", device, {"model": args.model, "views": args.views, "steps": args.steps,
                                                  "precision": args.precision}, rows)


if __name__ == "__main__":
    main()
