"""``PromptSegmenter``: text-prompted segmentation by prompt tuning a frozen vision-language model
(TuneVLSeg: Adhikari et al., "TuneVLSeg: Prompt Tuning Benchmark for Vision-Language Segmentation
Models", ACCV 2024), generic over prompt learners.

Every prompt learner of vlprompt works: textual ones (CoOp, CoCoOp, KgCoOp) shape the text feature
that conditions the decoder, visual ones (VPT, shallow or deep) shape the image tower's tokens the
decoder reads, multimodal ones (IVLP, MaPLe, UPT, PromptSRC) both. The head reads the backbone's
intermediate layers: CLIPSeg's own decoder when the weights are CLIPSeg's
(:class:`~vlprompt.backbones.HFCLIPBackbone`, :class:`~vlprompt.seg.HFCLIPSegHead`), else
vlprompt's CLIPSeg-style :class:`~vlprompt.seg.CLIPSegDecoder` over any ViT backbone. It is frozen
(``train_decoder=False``, the VLSM's own head) or trained with the prompt, and when trained its
parameters take part in every output whatever the prompt strategy.

Each image comes with its own prompt text. At every step the learner is pointed at the batch's
distinct prompts (as it would be at class names), and each image is conditioned on its prompt's
feature. Loss: Dice + 0.2 BCE (MONAI, as TuneVLSeg); metrics: Dice and IoU per image and
dataset-wide (:class:`~vlprompt.seg.SegmentationScores`), at the network's resolution. A learner's
own classification regulariser (KgCoOp, PromptSRC) is not used here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch.optim import Optimizer

from vlprompt.backbones import Backbone
from vlprompt.data.classnames import normalize_classname
from vlprompt.data.protocol import PreprocessedData, SegmentationData
from vlprompt.methods.data_link import SPLIT_OF_STAGE, attached_data
from vlprompt.methods.features import ImageFeatureCache
from vlprompt.methods.module import OptimizerFactory, PromptModule
from vlprompt.methods.optimization import LRSchedule
from vlprompt.prompts import PromptLearnerFactory
from vlprompt.seg.decoder import CLIPSegDecoder
from vlprompt.seg.heads import (
    DECODER_NAME,
    build_head,
    configured_head,
    decoder_layout,
    describe_layout,
    load_decoder_weights,
    prompt_head,
    save_decoder_weights,
)
from vlprompt.seg.metrics import SegmentationScores

__all__ = ["DECODER_NAME", "PromptSegmenter", "build_head", "configured_head", "decoder_layout", "load_decoder_weights", "prompt_head",
           "save_decoder_weights"]

log = logging.getLogger(__name__)

#: What the prompt learner is built for: each step re-points it at its batch's prompts, and every
#: run starts from this one.
FIRST_PROMPTS = ["object"]


def _adamw(params: Iterable[torch.nn.Parameter]) -> Optimizer:
    # TuneVLSeg's optimiser.
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4)


class PromptSegmenter(PromptModule):
    """Segment each image where its text prompt says (see the module docstring).

    Args:
        backbone: the frozen encoder (a ViT image tower).
        prompt_learner: factory ``(backbone, names) -> PromptLearner``; zero-shot (the prompt text
            as it is, ``templates="{}"``) when None.
        head: ``model``: the decoder that came with the model's weights (CLIPSeg's, through
            :class:`~vlprompt.backbones.HFCLIPBackbone`; :class:`~vlprompt.seg.HFCLIPSegHead`);
            ``decoder``: vlprompt's CLIPSeg-style decoder over any ViT backbone
            (:class:`~vlprompt.seg.CLIPSegDecoder`); ``auto``: the model's own when it has one.
        extract_layers: image-tower blocks vlprompt's decoder reads (default: a quarter, half and
            three quarters down, CLIPSeg's 3/6/9 of 12); the model's own decoder reads its own.
        reduce_dim, n_heads: width and attention heads of a new vlprompt decoder.
        decoder_weights: a trained head (safetensors, :func:`save_decoder_weights`), or
            ``zoo:NAME`` for the head shipped with an embedded model. Its recorded width and heads
            are used (``reduce_dim``/``n_heads`` are for a new decoder).
        train_decoder: train the decoder with the prompt (else it stays as loaded).
        init_prompt: a saved prompt (or Dassl checkpoint) to start from; a head saved with the
            prompt (``decoder.safetensors``) is loaded too, in place of ``decoder_weights``.

    What was learned is restored whatever is configured: a saved prompt's head (``init_prompt``)
    and a checkpoint's trained head replace the configured one (``train_decoder`` need not be
    repeated), and a head that does not fit the configured layout is refused. Resuming a fit
    continues to train the head when the checkpoint's fit did (its optimiser state holds it).
        cache_image_layers: keep the image tower's layers of each image when the learner leaves the
            image tower alone (textual prompts) and the images are not randomly augmented (always
            in evaluation): exact, and the tower runs once per image instead of once per epoch.
        lambda_dice, lambda_bce: loss weights (1 and 0.2 as TuneVLSeg).
        optimizer: factory over the trainable parameters (AdamW, lr 1e-3, weight decay 1e-4).
        Other arguments as for :class:`~vlprompt.methods.module.PromptModule`.
    """

    def __init__(
        self,
        backbone: Backbone,
        prompt_learner: PromptLearnerFactory | None = None,
        *,
        head: Literal["auto", "model", "decoder"] = "auto",
        extract_layers: list[int] | None = None,
        reduce_dim: int = 64,
        n_heads: int = 4,
        decoder_weights: str | None = None,
        train_decoder: bool = False,
        cache_image_layers: bool = True,
        lambda_dice: float = 1.0,
        lambda_bce: float = 0.2,
        optimizer: OptimizerFactory = _adamw,
        lr_scheduler: LRSchedule = "cosine",
        warmup_epochs: int = 0,
        warmup_lr: float = 1e-5,
        drop_last: bool = False,
        init_prompt: str | None = None,
    ) -> None:
        if prompt_learner is None:
            from functools import partial

            from vlprompt.prompts import ZeroShotPrompt

            prompt_learner = partial(ZeroShotPrompt, templates="{}")
        super().__init__(backbone, prompt_learner, FIRST_PROMPTS, optimizer=optimizer, lr_scheduler=lr_scheduler,
                         warmup_epochs=warmup_epochs, warmup_lr=warmup_lr, drop_last=drop_last,
                         init_prompt=init_prompt)
        self.save_hyperparameters(ignore=list(self._not_hyperparameters))
        self.decoder, from_prompt = configured_head(backbone, head, extract_layers, reduce_dim, n_heads,
                                                    decoder_weights, init_prompt)
        loaded = bool(decoder_weights) or from_prompt
        if not loaded and not train_decoder and isinstance(self.decoder, CLIPSegDecoder):
            log.warning("the decoder is neither loaded (decoder_weights, init_prompt) nor trained (train_decoder): it "
                        "stays random unless a checkpoint restores a trained one")
        self.train_decoder = train_decoder
        self.decoder.requires_grad_(train_decoder)
        #: whether the head's weights belong to what was learned (trained here, or restored from a
        #: prompt or checkpoint that trained it): then checkpoints keep them and save_prompt saves them.
        self.decoder_learned = train_decoder or from_prompt
        self.cache_image_layers = cache_image_layers
        #: the image tower's layers by image (learners that leave the tower alone, unaugmented data)
        self.feature_cache = ImageFeatureCache()
        from vlprompt.seg.losses import DiceBCELoss

        self.loss = DiceBCELoss(lambda_dice, lambda_bce)
        self.val_scores, self.test_scores = SegmentationScores(), SegmentationScores()
        #: Dice and IoU of the last test (per image and dataset-wide).
        self.test_results: dict[str, float] = {}

    def save_prompt(self, directory: str | Path, *, overwrite: bool = False) -> Path:
        """Save the learned prompt; a learned decoder goes with it (``decoder.safetensors`` in the
        same folder, which ``init_prompt`` and ``vlprompt segment --prompt`` pick up)."""
        directory = super().save_prompt(directory, overwrite=overwrite)
        if self.decoder_learned:
            save_decoder_weights(self.decoder, Path(directory) / DECODER_NAME)
        return directory

    def frozen_modules(self) -> tuple[str, ...]:
        return ("backbone",) if self.decoder_learned else ("backbone", "decoder")

    # -- checkpoints: the learned head is restored whatever is configured ------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["vlprompt"]["decoder"] = {"learned": self.decoder_learned, "trained": self.train_decoder,
                                             **self.decoder.layout()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        saved = {k.removeprefix("decoder."): v for k, v in state.items() if k.startswith("decoder.")}
        record = dict(checkpoint.get("vlprompt", {}).get("decoder") or {})
        # Checkpoints from before the record held the decoder exactly when it was trained.
        learned, trained = bool(record.get("learned", bool(saved))), bool(record.get("trained", bool(saved)))
        super().on_load_checkpoint(checkpoint)  # the backbone and the learner first: their errors say more
        if learned:
            self._check_saved_head(saved, record)
            if not self.decoder_learned:
                log.info("the checkpoint holds a trained segmentation head: restored (train_decoder need not be set)")
            state.update({f"decoder.{k}": v for k, v in saved.items()})  # over the configured head put there
            self.decoder_learned = True
        else:  # the checkpoint's head was the configured one, frozen: it is not in the file
            state.update({f"decoder.{k}": v for k, v in self.decoder.state_dict().items()})
        trainer = self._trainer
        resuming = trainer is not None and trainer.state.fn == "fit" and "optimizer_states" in checkpoint
        if resuming and trained != self.train_decoder:
            if self.train_decoder:
                raise ValueError("train_decoder=true cannot resume this checkpoint: its fit kept the decoder frozen, "
                                 "so its optimiser state has no head; resume without it, or start a new fit from "
                                 "the saved prompt (init_prompt) with train_decoder=true")
            log.warning("resuming a fit that trained the decoder: it is trained on (train_decoder=true), as the "
                        "checkpoint's optimiser state holds it")
            self.train_decoder = True
            self.hparams["train_decoder"] = True
            self.decoder.requires_grad_(True)

    def _check_saved_head(self, saved: dict[str, torch.Tensor], record: dict[str, Any]) -> None:
        """Refuse a checkpoint's trained head that does not fit the configured one, in one line."""
        own = self.decoder.layout()
        theirs = {k: record[k] for k in own if k in record}
        own_shapes = {k: tuple(v.shape) for k, v in self.decoder.state_dict().items()}
        saved_shapes = {k: tuple(v.shape) for k, v in saved.items()}
        if any(theirs[k] != own[k] for k in theirs) or own_shapes != saved_shapes:
            raise ValueError(f"the checkpoint holds a trained {describe_layout(theirs) if theirs else 'head'} that does not "
                             f"fit the configured {describe_layout(own)}; configure the head it was trained with "
                             "(head, extract_layers, reduce_dim, n_heads, decoder_weights)")

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        params = super().trainable_parameters()
        return params + (list(self.decoder.parameters()) if self.train_decoder else [])

    def configure_optimizers(self):
        if not self.trainable_parameters():
            raise ValueError(f"nothing to fit: the {self.prompt_learner.name} prompt has no learnable parameters "
                             "and the decoder is frozen (train_decoder=False)")
        return super().configure_optimizers()

    # -- forward -------------------------------------------------------------------------------
    def text_conditions(self, prompts: Sequence[str], images: torch.Tensor) -> torch.Tensor:
        """The conditioning feature of each image's prompt ``[B, embed_dim]``, through the learner."""
        distinct = list(dict.fromkeys(prompts))
        if any(not normalize_classname(p) for p in distinct):
            raise ValueError(f"empty segmentation prompt in {list(prompts)[:8]}")
        learner = self.prompt_learner
        if learner.classnames != [normalize_classname(p) for p in distinct]:
            learner.set_classnames(distinct)
            learner.to(images.device)  # new token buffers are made on the CPU
        index = torch.tensor([distinct.index(p) for p in prompts], device=images.device)
        if learner.image_conditioned:  # CoCoOp: one classifier per image
            features = learner.text_features(learner.encode_images(images))
            return features[torch.arange(len(prompts), device=images.device), index]
        features = learner.text_features()
        if features is None:
            raise ValueError(f"the {learner.name} prompt gives no text features (a learned linear head?); "
                             "segmentation conditions on text")
        return features[index]

    def forward(self, images: torch.Tensor, prompts: Sequence[str],
                layers: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """Mask logits ``[B, 1, H, W]`` of ``images`` for ``prompts`` (one per image); ``layers``:
        the image tower's layers when already known (cached)."""
        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        if layers is None:
            visual, placement = self.prompt_learner.image_prompts()
            layers = self.backbone.encode_image_layers(images, self.decoder.extract_layers, visual, placement)
        cond = self.text_conditions(prompts, images)
        return self.decoder(layers, cond, self.backbone.vision_prefix_tokens, tuple(images.shape[-2:]))

    # -- steps -----------------------------------------------------------------------------------
    def _image_layers(self, batch: dict[str, Any], stage: str) -> list[torch.Tensor]:
        """The batch's image-tower layers: from the cache when they cannot change (no visual
        prompts, no random augmentation; see ``cache_image_layers``), else encoded now."""
        images = batch["image"]
        visual, placement = self.prompt_learner.image_prompts()
        dm = self.segmentation_data()
        fingerprint = self._fingerprint(stage)
        if (visual is not None or not self.cache_image_layers or "index" not in batch or not fingerprint
                or (stage == "train" and (dm is None or dm.train_augmentation))):
            return self.backbone.encode_image_layers(images, self.decoder.extract_layers, visual, placement)

        def encode(pixels: torch.Tensor) -> torch.Tensor:
            return torch.stack(self.backbone.encode_image_layers(pixels, self.decoder.extract_layers), dim=1)

        return list(self.feature_cache.features(fingerprint, batch["index"], images, encode).unbind(1))

    def _batch_logits(self, batch: dict[str, Any], stage: str) -> torch.Tensor | None:
        self._count_unreadable(batch, stage)
        if batch["image"] is None:
            return None
        return self(batch["image"], batch["prompt"], self._image_layers(batch, stage))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        logits = self._batch_logits(batch, "train")
        if logits is None:
            return None
        loss = self.loss(logits, batch["mask"], batch.get("ignore"))
        self._check_finite(loss)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=len(logits))
        return loss

    def _evaluate(self, batch: dict[str, Any], stage: str, scores: SegmentationScores) -> None:
        logits = self._batch_logits(batch, stage)
        if logits is not None:
            if stage == "val":
                self.log("val/loss", self.loss(logits, batch["mask"], batch.get("ignore")), batch_size=len(logits),
                         sync_dist=True)
            scores.update(logits > 0, batch["mask"] > 0.5, batch.get("ignore"))

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, "val", self.val_scores)

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, "test", self.test_scores)

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]] | None:
        """Each image's mask probability at its original size, with its path and prompt."""
        logits = self._batch_logits(batch, "predict")
        if logits is None:
            return None
        out = []
        for i, prob in enumerate(logits.sigmoid()):
            size = tuple(batch["orig_size"][i]) if "orig_size" in batch else tuple(prob.shape[-2:])
            prob = F.interpolate(prob[None], size=size, mode="bilinear", align_corners=False)[0, 0]
            out.append({"image": batch.get("image_path", [None] * len(logits))[i], "prompt": batch["prompt"][i],
                        "probability": prob.cpu()})
        return out

    def _log_scores(self, stage: str, scores: SegmentationScores) -> dict[str, float]:
        values = {k: float(v) for k, v in scores.compute().items()}
        for name, value in values.items():
            self.log(f"{stage}/{name}", value, prog_bar=stage == "val" and name == "dice_per_image", sync_dist=True)
        scores.reset()
        return values

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            self.val_scores.reset()
            return
        self._log_scores("val", self.val_scores)
        self._log_unreadable("val")

    def on_test_epoch_end(self) -> None:
        self.test_results = self._log_scores("test", self.test_scores)
        self._log_unreadable("test")

    # -- the data module: image-text-mask data, no class names to follow -------------------------------
    def segmentation_data(self) -> SegmentationData | None:
        """The trainer's data module when it implements :class:`~vlprompt.data.protocol.SegmentationData`."""
        dm = attached_data(self)
        return dm if isinstance(dm, SegmentationData) else None

    def stage_dataset(self, stage: str) -> Any:
        dm = self.segmentation_data()
        return dm.dataset(SPLIT_OF_STAGE[stage]) if dm is not None else None

    def setup(self, stage: str) -> None:
        super().setup(stage)
        dm = attached_data(self)
        if isinstance(dm, PreprocessedData):
            dm.set_preprocess(self.backbone.preprocess_cfg)
        # Each step points the learner at its batch's prompts, so after a run every process holds
        # token buffers of other shapes. DDP copies rank 0's parameters and buffers to the others
        # when it wraps the model (after this hook): start every run from the same placeholder.
        if self.prompt_learner.classnames != FIRST_PROMPTS:
            self.prompt_learner.set_classnames(FIRST_PROMPTS)
