"""One segmentation training step per prompt strategy (text: CoOp, visual: VPT-deep, multimodal:
MaPLe) at 352 px, plain vs vlprompt, on a random ViT-B-16 CLIP with a CLIPSeg-style head, or
(``--vlsm clipseg``) on a random CLIPSeg rd64-refined (transformers; ViT-B/16, its own decoder).

- ``plain``: the whole image tower runs (its intermediate layers read on the way) and the text
  tower runs over the full 77-token context, as a re-implemented CLIPSeg forward does;
- ``vlprompt``: the image tower stops after the deepest layer the decoder reads (CLIPSeg's
  depth limit; blocks 3/6/9 of 12 -> 9 blocks run) and the text is cut at its longest prompt (exact:
  the text tower is causal).

Both variants run in this process on the same model, images, prompts and masks; the script prints
the median step time of each, their ratio, and the loss of each (the same: both are exact).

    python benchmarks/segmentation_step.py                      # batch 4, 352 px, CPU
    python benchmarks/segmentation_step.py --vlsm clipseg         # CLIPSeg's architecture
    python benchmarks/segmentation_step.py --device cuda --batch-size 32
"""

from __future__ import annotations

import argparse
import functools
import logging

import torch

from timing import add_json_argument, peak_memory_mib, random_open_clip, reset_peak_memory, timed, write_json
from vlprompt.backbones import Backbone, HFCLIPBackbone
from vlprompt.methods import PromptSegmenter
from vlprompt.prompts import CoOpPromptLearner, MaPLePromptLearner, VPTPromptLearner

log = logging.getLogger("benchmarks.segmentation_step")

STRATEGIES = {
    "text (CoOp)": functools.partial(CoOpPromptLearner, n_ctx=16),
    "visual (VPT-deep)": functools.partial(VPTPromptLearner, n_tokens=8, templates="{}"),
    "multimodal (MaPLe)": functools.partial(MaPLePromptLearner),
}


def _clipseg(size: int, device: torch.device) -> HFCLIPBackbone:
    """A random-weight CLIPSeg with the layout of ``CIDAS/clipseg-rd64-refined``."""
    import transformers

    config = transformers.CLIPSegConfig(vision_config={"patch_size": 16}, extract_layers=[3, 6, 9], reduce_dim=64,
                                        use_complex_transposed_convolution=True)
    model = transformers.CLIPSegForImageSegmentation(config)
    return HFCLIPBackbone.from_model(model, name="random CLIPSeg rd64-refined", image_size=size).to(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-16", help="open_clip model (with vlprompt's CLIPSeg-style decoder)")
    parser.add_argument("--vlsm", choices=["clipseg"], default=None, help="CLIPSeg's own architecture instead")
    parser.add_argument("--size", type=int, default=352)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    add_json_argument(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device(args.device)
    torch.manual_seed(0)
    backbone: Backbone = _clipseg(args.size, device) if args.vlsm else random_open_clip(args.model, args.size, device)
    images = torch.randn(args.batch_size, 3, args.size, args.size, device=device)
    masks = (torch.rand(args.batch_size, 1, args.size, args.size, device=device) > 0.7).float()
    prompts = [f"a photo of object number {i}" for i in range(args.batch_size)]
    depth = backbone.vision_layers
    log.info("%s at %d px, batch %d, %s; decoder reads blocks %s of %d", args.vlsm or args.model, args.size, args.batch_size,
             device, PromptSegmenter(backbone, train_decoder=True).decoder.extract_layers, depth)
    log.info("%-20s %10s %10s %7s %11s %11s", "strategy", "plain s", "vlprompt s", "ratio", "plain loss", "vlprompt loss")
    rows = []
    for name, factory in STRATEGIES.items():
        results = {}
        for variant in ("plain", "vlprompt"):
            torch.manual_seed(1)
            model = PromptSegmenter(backbone, factory, train_decoder=True).to(device)
            optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)
            backbone.truncate_text = variant == "vlprompt"
            read = model.decoder.extract_layers
            if variant == "plain":  # run every block, read the same ones on the way
                every = functools.partial(type(backbone).encode_image_layers, backbone)
                backbone.encode_image_layers = lambda x, layers, *a, **k: every(x, [*layers, depth - 1], *a, **k)[:-1]

            def step() -> float:
                loss = model.loss(model(images, prompts), masks)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                return loss.item()

            with torch.no_grad():  # the same first loss in both variants (exactness)
                first = model.loss(model(images, prompts), masks).item()
            reset_peak_memory(device)
            results[variant] = (timed(step, args.repeats, device)[0], first)
            rows.append({"strategy": name, "variant": variant, "seconds": results[variant][0], "loss": first,
                         "peak_mib": peak_memory_mib(device)})
            backbone.__dict__.pop("encode_image_layers", None)
            assert model.decoder.extract_layers == read
        (plain_t, plain_l), (fast_t, fast_l) = results["plain"], results["vlprompt"]
        log.info("%-20s %10.3f %10.3f %6.2fx %11.5f %11.5f", name, plain_t, fast_t, plain_t / fast_t, plain_l, fast_l)
    backbone.truncate_text = True
    write_json(args.json, "segmentation_step", device, {"vlsm": args.vlsm or args.model, "size": args.size,
                                                        "batch_size": args.batch_size}, rows)


if __name__ == "__main__":
    main()
