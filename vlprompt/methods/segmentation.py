"""``PromptSegmenter``: text-prompted segmentation by prompt tuning a frozen vision-language model
(TuneVLSeg: Adhikari et al., "TuneVLSeg: Prompt Tuning Benchmark for Vision-Language Segmentation
Models", ACCV 2024), generic over prompt learners.

Every prompt learner of vlprompt works: textual ones (CoOp, CoCoOp, KgCoOp) shape the text feature
that conditions the decoder, visual ones (VPT, shallow or deep) shape the image tower's tokens the
decoder reads, multimodal ones (IVLP, MaPLe, UPT, PromptSRC, TuneVLSeg's shared-separate and
shared-attention) both. Visual prompts are removed before the decoder unless
``carry_visual_prompts`` (TuneVLSeg's way); TuneVLSeg's trained "new last layer" is an option.
The head reads the backbone's intermediate layers: CLIPSeg's own decoder when the weights are CLIPSeg's
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

import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch.optim import Optimizer

from vlprompt.backbones import Backbone, TextTokens
from vlprompt.data.classnames import normalize_classname
from vlprompt.data.protocol import PreprocessedData, SegmentationData
from vlprompt.methods.data_link import SPLIT_OF_STAGE, attached_data
from vlprompt.methods.features import ImageFeatureCache
from vlprompt.methods.module import OptimizerFactory, PromptModule
from vlprompt.methods.optimization import LRSchedule
from vlprompt.prompts import PromptLearnerFactory
from vlprompt.seg.cris import CRISHead
from vlprompt.seg.cris_inputs import (
    MapPacking,
    cris_last_layer,
    image_map_inputs,
    prompt_text_tokens,
    refuse_visual_prompts,
)
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
from vlprompt.seg.last_layer import (
    LAST_LAYER_NAME,
    LastLayerMix,
    LastLayerSettings,
    configured_last_layer,
)
from vlprompt.seg.metrics import SegmentationScores

__all__ = ["DECODER_NAME", "PromptSegmenter", "build_head", "configured_head", "decoder_layout", "load_decoder_weights", "prompt_head",
           "save_decoder_weights"]

log = logging.getLogger(__name__)

#: What the prompt learner is built for: each step re-points it at its batch's prompts, and every
#: run starts from this one.
FIRST_PROMPTS = ["object"]


def _adamw(params: Iterable[torch.nn.Parameter]) -> Optimizer:
    # vlprompt's default for segmentation. TuneVLSeg's recipe is AdamW at lr 2e-4 with AdamW's own
    # weight decay of 0.01 (configs/seg/tunevlseg_recipe.yaml).
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4)


#: Segmenter settings a prompt was tuned with and must be used with (next to the prompt).
SETTINGS_NAME = "segmentation.json"


def _saved_carry(init_prompt: str | None, configured: bool) -> bool:
    """Whether the visual prompts pass through the decoder: as the prompt ``init_prompt`` was
    tuned (its ``segmentation.json``), else as configured."""
    from vlprompt.zoo import prompt_file

    path = prompt_file(init_prompt, SETTINGS_NAME)
    saved = bool(json.loads(path.read_text()).get("carry_visual_prompts")) if path is not None else configured
    if saved != configured:
        log.info("init_prompt %s was tuned with carry_visual_prompts=%s: used", init_prompt, saved)
    return saved


def _prompt_text_as_it_is() -> PromptLearnerFactory:
    """Zero-shot: each prompt's text as it is (``templates="{}"``)."""
    from functools import partial

    from vlprompt.prompts import ZeroShotPrompt

    return partial(ZeroShotPrompt, templates="{}")


class PromptSegmenter(PromptModule):
    """Segment each image where its text prompt says (see the module docstring).

    Args:
        backbone: the frozen encoder (a ViT image tower).
        prompt_learner: factory ``(backbone, names) -> PromptLearner``; zero-shot (the prompt text
            as it is, ``templates="{}"``) when None.
        head: ``model``: the decoder that came with the model's weights (CLIPSeg's, through
            :class:`~vlprompt.backbones.HFCLIPBackbone`; :class:`~vlprompt.seg.HFCLIPSegHead`);
            ``decoder``: vlprompt's CLIPSeg-style decoder over any ViT backbone
            (:class:`~vlprompt.seg.CLIPSegDecoder`); ``cris``: CRIS's head over a CLIP with a ResNet
            image tower (:class:`~vlprompt.seg.cris.CRISHead`; text prompt learners only);
            ``auto``: the model's own when it has one, CRIS's for a ResNet CLIP, else ``decoder``.
        extract_layers: image-tower blocks vlprompt's decoder reads (default: a quarter, half and
            three quarters down, CLIPSeg's 3/6/9 of 12); the model's own decoder reads its own.
        reduce_dim, n_heads: width and attention heads of a new vlprompt decoder.
        head_options: settings of a new CRIS head (``num_layers``, ``num_heads``, ``dim_ffn``,
            ``dropout``; CRIS's 3, 8, 2048, 0.2 by default).
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
        optimizer: factory over the trainable parameters (vlprompt's default: AdamW, lr 1e-3,
            weight decay 1e-4; TuneVLSeg's recipe, ``configs/seg/tunevlseg_recipe.yaml``: lr 2e-4,
            weight decay 0.01).
        lr_scheduler: as for :class:`~vlprompt.methods.module.PromptModule`, or ``plateau``:
            TuneVLSeg's ``ReduceLROnPlateau`` on the validation loss (``val/loss``, mode min,
            ``plateau_factor`` 0.2, ``plateau_patience`` 5 epochs, stepped once per epoch).
        carry_visual_prompts: hand the decoder the image tower's layers with the visual prompt
            tokens still in (after the patches), dropped only after its blocks, as TuneVLSeg's
            CLIPSeg wrappers do; by default (False) they are removed before the decoder, so the
            VLSM's head reads the token layout it was trained with and the visual prompts act only
            through the image tower. Needs ``after_patches`` prompts (MaPLe, the shared strategies;
            VPT with ``placement: after_patches``).
        new_last_layer: add TuneVLSeg's trained "new last layer"
            (:class:`~vlprompt.seg.last_layer.NewLastLayer`: ``new_last_layer_kernel_size`` 5,
            mixing ratio starting at ``residual_ratio`` 0.5, ``new_last_layer_mix`` ``ratio`` or
            ``sum``), trained with the prompt and saved with it (``last_layer.safetensors``).
        Other arguments as for :class:`~vlprompt.methods.module.PromptModule`.
    """

    def __init__(
        self,
        backbone: Backbone,
        prompt_learner: PromptLearnerFactory | None = None,
        *,
        head: Literal["auto", "model", "decoder", "cris"] = "auto",
        extract_layers: list[int] | None = None,
        reduce_dim: int = 64,
        n_heads: int = 4,
        head_options: dict[str, Any] | None = None,
        decoder_weights: str | None = None,
        train_decoder: bool = False,
        cache_image_layers: bool = True,
        lambda_dice: float = 1.0,
        lambda_bce: float = 0.2,
        optimizer: OptimizerFactory = _adamw,
        lr_scheduler: LRSchedule | Literal["plateau"] = "cosine",
        warmup_epochs: int = 0,
        warmup_lr: float = 1e-5,
        drop_last: bool = False,
        init_prompt: str | None = None,
        plateau_factor: float = 0.2,
        plateau_patience: int = 5,
        carry_visual_prompts: bool = False,
        new_last_layer: bool = False,
        new_last_layer_kernel_size: int = 5,
        residual_ratio: float = 0.5,
        new_last_layer_mix: LastLayerMix = "ratio",
    ) -> None:
        super().__init__(backbone, prompt_learner or _prompt_text_as_it_is(), FIRST_PROMPTS, optimizer=optimizer,
                         lr_scheduler="constant" if lr_scheduler == "plateau" else lr_scheduler,
                         warmup_epochs=warmup_epochs, warmup_lr=warmup_lr, drop_last=drop_last, init_prompt=init_prompt)
        self.save_hyperparameters(ignore=list(self._not_hyperparameters))
        self.decoder, from_prompt = configured_head(backbone, head, extract_layers, reduce_dim, n_heads,
                                                    decoder_weights, init_prompt, head_options)
        self.map_packing = self._map_inputs(carry_visual_prompts)
        loaded = bool(decoder_weights) or from_prompt
        if not loaded and not train_decoder and isinstance(self.decoder, (CLIPSegDecoder, CRISHead)):
            log.warning("the decoder is neither loaded (decoder_weights, init_prompt) nor trained (train_decoder): it "
                        "stays random unless a checkpoint restores a trained one")
        self.train_decoder = train_decoder
        self.decoder.requires_grad_(train_decoder)
        #: whether the head's weights belong to what was learned (trained here, or restored from a
        #: prompt or checkpoint that trained it): then checkpoints keep them and save_prompt saves them.
        self.decoder_learned = train_decoder or from_prompt
        self.cache_image_layers = cache_image_layers
        self.plateau = (plateau_factor, plateau_patience) if lr_scheduler == "plateau" else None
        self.carry_visual_prompts = _saved_carry(init_prompt, carry_visual_prompts)
        self._set_last_layer(init_prompt, LastLayerSettings(new_last_layer_kernel_size, residual_ratio, new_last_layer_mix)
                             if new_last_layer else None)
        #: the image tower's layers by image (learners that leave the tower alone, unaugmented data)
        self.feature_cache = ImageFeatureCache()
        from vlprompt.seg.losses import DiceBCELoss

        self.loss = DiceBCELoss(lambda_dice, lambda_bce)
        self.val_scores, self.test_scores = SegmentationScores(), SegmentationScores()
        #: Dice and IoU of the last test (per image and dataset-wide).
        self.test_results: dict[str, float] = {}

    def _map_inputs(self, carry_visual_prompts: bool) -> MapPacking:
        """For a head that reads maps (CRIS, a ResNet image tower), refuse visual prompts; how maps
        are packed in the feature cache."""
        if self.decoder.image_input == "maps":
            refuse_visual_prompts(self.prompt_learner.name, self.prompt_learner.uses_image_tower)
            if carry_visual_prompts:
                raise ValueError("carry_visual_prompts is for CLIPSeg-style heads: CRIS takes no visual prompts")
        return MapPacking()

    def _set_last_layer(self, init_prompt: str | None, settings: LastLayerSettings | None) -> None:
        #: TuneVLSeg's trained new last layer (None: the head's own logits); one saved with init_prompt is restored
        if self.decoder.image_input == "maps":  # CRIS's own (TuneVLSeg's COOPCRIS)
            self.last_layer = cris_last_layer(self.decoder.settings["vis_dim"], init_prompt, settings)
            return
        self.last_layer = configured_last_layer(self.decoder.reduce_dim, self.backbone.patch_size, init_prompt, settings)

    def save_prompt(self, directory: str | Path, *, overwrite: bool = False) -> Path:
        """Save the learned prompt; a learned decoder goes with it (``decoder.safetensors`` in the
        same folder, which ``init_prompt`` and ``vlprompt segment --prompt`` pick up)."""
        directory = super().save_prompt(directory, overwrite=overwrite)
        if self.decoder_learned:
            save_decoder_weights(self.decoder, Path(directory) / DECODER_NAME)
        if self.last_layer is not None:  # either kind records its layout
            save_decoder_weights(self.last_layer, Path(directory) / LAST_LAYER_NAME)
        if self.carry_visual_prompts:
            (Path(directory) / SETTINGS_NAME).write_text(json.dumps({"carry_visual_prompts": True}))
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
        params += list(self.last_layer.parameters()) if self.last_layer is not None else []
        return params + (list(self.decoder.parameters()) if self.train_decoder else [])

    def configure_optimizers(self):
        if not self.trainable_parameters():
            raise ValueError(f"nothing to fit: the {self.prompt_learner.name} prompt has no learnable parameters "
                             "and the decoder is frozen (train_decoder=False)")
        built = super().configure_optimizers()
        if self.plateau is None:
            return built
        # TuneVLSeg's schedule: ReduceLROnPlateau on the validation loss, checked once per epoch.
        factor, patience = self.plateau
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(built, mode="min", factor=factor, patience=patience)
        return {"optimizer": built,
                "lr_scheduler": {"scheduler": plateau, "monitor": "val/loss", "interval": "epoch", "frequency": 1}}

    # -- forward -------------------------------------------------------------------------------
    def _point_learner(self, prompts: Sequence[str], device: torch.device) -> torch.Tensor:
        """Point the learner at the distinct ``prompts``; each prompt's index among them."""
        distinct = list(dict.fromkeys(prompts))
        if any(not normalize_classname(p) for p in distinct):
            raise ValueError(f"empty segmentation prompt in {list(prompts)[:8]}")
        learner = self.prompt_learner
        if learner.classnames != [normalize_classname(p) for p in distinct]:
            learner.set_classnames(distinct)
            learner.to(device)  # new token buffers are made on the CPU
        return torch.tensor([distinct.index(p) for p in prompts], device=device)

    def text_tokens(self, prompts: Sequence[str], images: torch.Tensor, image_features: torch.Tensor) -> TextTokens:
        """Each image's prompt's word features, padding and sentence feature through the learner
        (CRIS); ``image_features``: what an image-conditioned learner (CoCoOp) is given."""
        with self.backbone.capture_text_tokens() as captured:
            index = self.text_conditions(prompts, images, image_features, return_index=True)
        return prompt_text_tokens(captured, index, self.prompt_learner.num_classes,
                                  self.prompt_learner.image_conditioned)

    def text_conditions(self, prompts: Sequence[str], images: torch.Tensor, image_features: torch.Tensor | None = None,
                        return_index: bool = False) -> torch.Tensor:
        """The conditioning feature of each image's prompt ``[B, embed_dim]``, through the learner
        (an image-conditioned one gets ``image_features``, by default its own encoding of the
        images); with ``return_index`` each image's prompt's index among the learner's instead."""
        index = self._point_learner(prompts, images.device)
        learner = self.prompt_learner
        if learner.image_conditioned:  # CoCoOp: one classifier per image
            features = learner.text_features(learner.encode_images(images) if image_features is None else image_features)
            if return_index:
                return index
            return features[torch.arange(len(prompts), device=images.device), index]
        features = learner.text_features()
        if features is None:
            raise ValueError(f"the {learner.name} prompt gives no text features (a learned linear head?); "
                             "segmentation conditions on text")
        return index if return_index else features[index]

    def forward(self, images: torch.Tensor, prompts: Sequence[str],
                layers: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """Mask logits ``[B, 1, H, W]`` of ``images`` for ``prompts`` (one per image); ``layers``:
        the image tower's layers when already known (cached)."""
        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        if self.decoder.image_input == "maps":
            return self._forward_maps(images, prompts, layers)
        if layers is None:
            layers = self._encode_layers(images)
        cond = self.text_conditions(prompts, images)
        prefix = self.backbone.vision_prefix_tokens
        # the visual prompt tokens the layers carry after the patches (none unless carry_visual_prompts)
        carried = layers[0].shape[1] - prefix - self._patch_count(images) if self.carry_visual_prompts else 0
        return self.decoder(layers, cond, prefix, tuple(images.shape[-2:]), trailing_tokens=carried,
                            last_layer=self.last_layer)

    def _patch_count(self, images: torch.Tensor) -> int:
        ph, pw = self.backbone.patch_size
        return (images.shape[-2] // ph) * (images.shape[-1] // pw)

    def _encode_layers(self, images: torch.Tensor, prompts: tuple[Any, str] | None = None) -> list[torch.Tensor]:
        """The image tower's layers the decoder reads, with the learner's visual prompts
        (``prompts``: as already asked of the learner; kept in the layers with
        ``carry_visual_prompts``)."""
        visual, placement = prompts if prompts is not None else self.prompt_learner.image_prompts()
        keep = self.carry_visual_prompts and visual is not None
        if keep and placement != "after_patches":
            raise ValueError(f"carry_visual_prompts: TuneVLSeg appends its visual prompts after the patches; the "
                             f"{self.prompt_learner.name} prompt places them {placement!r} (set its placement to "
                             "'after_patches')")
        return self.backbone.encode_image_layers(images, self.decoder.extract_layers, visual, placement,
                                                 keep_prompts=keep)

    def _forward_maps(self, images: torch.Tensor, prompts: Sequence[str],
                      maps: Sequence[torch.Tensor] | None) -> torch.Tensor:
        """CRIS: the ResNet's maps (:func:`~vlprompt.seg.cris_inputs.image_map_inputs`) and the
        prompts' word features; CoCoOp is given C5 averaged over positions, as in TuneVLSeg."""
        visual = self.decoder.visual_maps(maps if maps is not None else image_map_inputs(self.backbone, images))
        text = self.text_tokens(prompts, images, self.decoder.image_features(visual))
        return self.decoder(visual, text, tuple(images.shape[-2:]), last_layer=self.last_layer)

    def _cached_maps(self, batch: dict[str, Any], fingerprint: str) -> list[torch.Tensor]:
        """CRIS's maps from the feature cache (maps of several shapes, one flat tensor per image)."""
        images = batch["image"]
        size = tuple(images.shape[-2:])
        packed = self.feature_cache.features(
            fingerprint, batch["index"], images,
            lambda pixels: self.map_packing.pack(image_map_inputs(self.backbone, pixels), size))
        if size not in self.map_packing.shapes:  # every image came from the cache of an earlier run
            self.map_packing.pack(image_map_inputs(self.backbone, images[:1]), size)
        return self.map_packing.unpack(packed, size)

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
            if self.decoder.image_input == "maps":
                return image_map_inputs(self.backbone, images)
            return self._encode_layers(images, (visual, placement))
        if self.decoder.image_input == "maps":
            return self._cached_maps(batch, fingerprint)

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
