"""Test-time prompt tuning: episodic prompt tuning on each test image without labels.

``TestTimePromptTuning`` is TPT; ``DiffTPT`` adds diffusion-generated views filtered by cosine
similarity to the original."""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.optim import Optimizer

from vlprompt.backbones import Backbone
from vlprompt.methods.data_link import ReadsClassificationData
from vlprompt.methods.metrics import ClassCounts
from vlprompt.methods.module import PromptModule
from vlprompt.methods.reports import ClassAccuracyReport
from vlprompt.prompts import CoOpPromptLearner, PromptLearnerFactory
from vlprompt.tta.diffusion import DiffusionViews, ViewCache, ViewGenerator
from vlprompt.tta.views import (
    TestTimeViews,
    confident_views,
    marginal_entropy,
    similar_views,
)

__all__ = ["DiffTPT", "Episode", "TestTimePromptTuning"]

log = logging.getLogger(__name__)


def _default_optimizer(params: Iterable[torch.nn.Parameter]) -> Optimizer:
    # TPT's recipe: AdamW, lr 5e-3.
    return torch.optim.AdamW(params, lr=5e-3)


@dataclass
class Episode:
    """What one test-time episode did: the adapted prediction of the original image, the
    prediction before adaptation (the starting prompt's), and the views the loss used."""

    logits: torch.Tensor
    start_logits: torch.Tensor
    kept: torch.Tensor


class TestTimePromptTuning(ReadsClassificationData, PromptModule):
    """Test-Time Prompt Tuning (Shu et al., NeurIPS 2022, "Test-Time Prompt Tuning for Zero-Shot
    Generalization in Vision-Language Models"), used with ``trainer.test``/``trainer.predict``.

    For every test image, independently: reset the prompt *and* the optimiser state, build
    ``n_views`` views (the original plus random views, in one batch), keep the
    ``selection_ratio`` most confident (lowest-entropy) views, take ``steps`` optimiser steps on
    the entropy of their averaged prediction, then classify the original image.

    The trainer must run with ``inference_mode=False`` (Lightning's default would forbid the
    gradient steps). Built from :class:`~vlprompt.methods.module.PromptModule` (the prompt, its
    initialisation, unreadable images), the data protocol
    :class:`~vlprompt.data.protocol.ClassificationData` (class names, test-time views) and the test
    half of :class:`~vlprompt.methods.reports.ClassAccuracyReport` (``test/acc``,
    ``test/acc_per_class_mean``, ``test/images``); it is never fit.

    Args:
        backbone: the frozen encoder.
        prompt_learner: factory ``(backbone, classnames) -> PromptLearner``; TPT's 4 context
            tokens from "a photo of a" when None.
        classnames: class names by label.
        n_views: views per image, the original included (64 in the paper).
        augmix: AugMix on the random views, as TPT does it (its operation set, 3 chains, severity
            1; the paper does so except on ImageNet and its variants).
        crop_scale: area range of the random resized crops (TPT's default 0.08-1; objects that
            fill little of the frame want more of it).
        crop_interpolation: ``bilinear`` (TPT's reference code) or ``backbone`` (the backbone's own
            interpolation, usually bicubic) for resizing the random crops.
        selection_ratio: share of views kept by confidence (0.1 in the paper).
        steps: optimiser steps per image (1 in the paper).
        optimizer: factory over the prompt parameters (AdamW, lr 5e-3).
        init_prompt: a saved vlprompt prompt or a CoOp/CoCoOp (Dassl) checkpoint to start from.
        seed: seed of the random views (mixed with each image's content).
    """

    __test__ = False  # not a pytest test class, despite its name

    def __init__(
        self,
        backbone: Backbone,
        prompt_learner: PromptLearnerFactory | None = None,
        classnames: list[str] | None = None,
        *,
        n_views: int = 64,
        augmix: bool = False,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        crop_interpolation: Literal["bilinear", "backbone"] = "bilinear",
        selection_ratio: float = 0.1,
        steps: int = 1,
        optimizer: Callable[[Iterable[torch.nn.Parameter]], Optimizer] = _default_optimizer,
        init_prompt: str | None = None,
        seed: int = 0,
    ) -> None:
        if not classnames:
            raise ValueError(f"{type(self).__name__} needs class names: pass classnames=[...] or let the CLI link "
                             "them from the data module")
        factory = prompt_learner or functools.partial(CoOpPromptLearner, n_ctx=4, ctx_init="a photo of a")
        super().__init__(backbone, factory, classnames, optimizer=optimizer, init_prompt=init_prompt)
        self.save_hyperparameters(ignore=list(self._not_hyperparameters))
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        self.n_views, self.augmix, self.seed, self.crop_scale = n_views, augmix, seed, tuple(crop_scale)
        self.crop_interpolation = crop_interpolation
        self.selection_ratio, self.steps = selection_ratio, steps
        self._episode_start: tuple[dict[str, torch.Tensor], dict[str, Any], Optimizer] | None = None
        #: Images whose loss was not finite: they keep the starting prompt's prediction.
        self.unadapted_images = 0
        #: Accuracy of each class in the last test; None for a class without test images.
        self.per_class_accuracy: dict[str, float | None] = {}
        self.scores = ClassAccuracyReport(self.prompt_learner.num_classes)

    # -- classes come from the data module -----------------------------------------------------
    @property
    def test_counts(self) -> ClassCounts:
        return self.scores.test_counts

    def set_classnames(self, classnames: list[str]) -> None:
        """Classify among other classes: re-point the prompt and reset the metrics."""
        self.prompt_learner.set_classnames(classnames)
        self.hparams["classnames"] = list(self.prompt_learner.classnames)
        self.scores = ClassAccuracyReport(self.prompt_learner.num_classes)
        self._metric_attributes = None  # Lightning caches which attribute holds which metric

    def _follow_classes(self) -> None:
        dm = self.classification_data()
        if dm is not None and list(dm.classnames) != self.prompt_learner.classnames:
            names = list(dm.classnames)
            log.info("data has %d classes (%s...); re-pointing the prompt at them", len(names), ", ".join(names[:3]))
            self.set_classnames(names)
            self.to(self.device)

    # -- views come from the data module ------------------------------------------------------
    def setup(self, stage: str) -> None:
        dm = self.classification_data()
        if dm is not None:
            dm.set_preprocess(self.backbone.preprocess_cfg)
        if dm is None:
            raise ValueError(
                "test-time prompt tuning needs a data module implementing vlprompt.data.ClassificationData "
                "(e.g. FewShotDataModule or TestImagesDataModule): it hands the views to the data"
            )
        dm.set_eval_transform(self.view_transform())

    def view_transform(self) -> Callable:
        """Image -> ``[n, 3, H, W]`` views, the original first (handed to the data module)."""
        return TestTimeViews(self.backbone.preprocess_cfg, self.n_views, self.augmix, self.seed, self.crop_scale,
                             self.crop_interpolation)

    def teardown(self, stage: str) -> None:
        dm = self.classification_data()
        if dm is not None:
            dm.set_eval_transform(None)

    # -- one episode per image ---------------------------------------------------------------
    def _reset(self) -> Optimizer:
        """Put the prompt and the optimiser back to where every episode starts."""
        if self._episode_start is None:
            params = [p for p in self.prompt_learner.parameters() if p.requires_grad]
            optimizer = self.optimizer_factory(params)
            state = copy.deepcopy(self.prompt_learner.state_dict())
            self._episode_start = (state, copy.deepcopy(optimizer.state_dict()), optimizer)
        state, optimizer_state, optimizer = self._episode_start
        self.prompt_learner.load_state_dict(state)
        optimizer.load_state_dict(optimizer_state)
        return optimizer

    def _episode_logits(self, views: torch.Tensor, image_features: torch.Tensor | None) -> torch.Tensor:
        if image_features is not None:
            return self.logits(self.prompt_learner(image_features=image_features))
        return self.logits(self.prompt_learner(images=views))

    def select_views(self, views: torch.Tensor, features: torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor:
        """Indices of the views the entropy loss uses: the most confident ones."""
        del views, features
        return confident_views(logits, self.selection_ratio)

    def run_episode(self, views: torch.Tensor) -> Episode:
        """Run one episode on the views of one image (``views[0]`` is the original)."""
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                "test-time prompt tuning takes gradient steps: run the trainer with inference_mode=False"
            )
        optimizer = self._reset()
        # A learner that leaves the image tower alone sees the same image features every step.
        features = None
        if not self.prompt_learner.uses_image_tower:
            with torch.no_grad():
                features = self.prompt_learner.encode_images(views)
        with torch.no_grad():
            start_logits = self._episode_logits(views, features)
        keep = self.select_views(views, features, start_logits)
        if self.steps:
            kept_views = views[keep]
            kept_features = features[keep] if features is not None else None
            with torch.enable_grad():
                for _ in range(self.steps):
                    loss = marginal_entropy(self._episode_logits(kept_views, kept_features))
                    if not torch.isfinite(loss):
                        # Never predict from a broken prompt: keep the starting one for this image.
                        self.unadapted_images += 1
                        log.warning("non-finite TPT loss (%s); this image keeps the starting prompt's prediction "
                                    "(%d so far)", loss.item(), self.unadapted_images)
                        return Episode(logits=start_logits[0], start_logits=start_logits[0], kept=keep)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
        with torch.no_grad():
            logits = self._episode_logits(views[:1], features[:1] if features is not None else None)[0]
        return Episode(logits=logits, start_logits=start_logits[0], kept=keep)

    def adapt_and_predict(self, views: torch.Tensor) -> torch.Tensor:
        """The logits ``[C]`` of the original image (``views[0]``) after one episode."""
        return self.run_episode(views).logits

    def _tta_step(self, batch: dict[str, Any], stage: str) -> list[Episode] | None:
        self._count_unreadable(batch, stage)
        if batch["image"] is None:
            return None
        images = batch["image"]
        if images.dim() != 5:
            raise ValueError(f"expected views [B, n_views, 3, H, W], got {tuple(images.shape)}")
        return [self.run_episode(views) for views in images]

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        episodes = self._tta_step(batch, "test")
        if episodes is not None:
            self.test_counts.update(torch.stack([e.logits for e in episodes]).argmax(-1), batch["label"])

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any] | None:
        """Per image: ``prediction`` and ``confidence`` after adaptation, the same before it
        (``start_*``), and the indices of the views the loss used (``kept``)."""
        episodes = self._tta_step(batch, "predict")
        if episodes is None:
            return None
        confidence, prediction = torch.stack([e.logits for e in episodes]).softmax(-1).max(-1)
        start_confidence, start_prediction = torch.stack([e.start_logits for e in episodes]).softmax(-1).max(-1)
        return {
            "index": batch["index"],
            "prediction": prediction,
            "confidence": confidence,
            "start_prediction": start_prediction,
            "start_confidence": start_confidence,
            "kept": [e.kept.cpu() for e in episodes],
        }

    def on_test_start(self) -> None:
        self._follow_classes()
        self.test_counts.reset()
        self._episode_start = None  # classes may have changed: snapshot the prompt afresh

    def on_predict_start(self) -> None:
        self._follow_classes()
        self._episode_start = None

    def on_test_epoch_end(self) -> None:
        self.scores.test_epoch_end(self, self.prompt_learner.classnames, ())
        self._log_unreadable("test")

    # The adapted prompt belongs to the last image only; leave the starting prompt behind.
    def on_test_end(self) -> None:
        self._restore_start()

    def on_predict_end(self) -> None:
        self._restore_start()

    def _restore_start(self) -> None:
        if self._episode_start is not None:
            self.prompt_learner.load_state_dict(self._episode_start[0])


class DiffTPT(TestTimePromptTuning):
    """DiffTPT (Feng et al., ICCV 2023, "Diverse Data Augmentation with Diffusions for Effective
    Test-time Prompt Tuning"): TPT whose views also include images from a diffusion model.

    Per image: the ``n_views`` conventional views (the original first) and the generator's views
    are encoded in one batch; generated views are filtered by cosine similarity to the original
    (keeping the ``filter_ratio`` most similar), then the ``selection_ratio`` most confident views
    among the original, the conventional and the kept generated views drive ``steps`` entropy steps.

    The paper filters on image features; the reference code filters on logits and over all views,
    conventional ones included (``filter_on="logits", filter_scope="all"``). Defaults follow the
    reference scripts otherwise: 4 steps, filter ratio 0.8, selection ratio 0.3.

    Args:
        generator: the diffusion view generator (:class:`~vlprompt.tta.SDEditGenerator`,
            :class:`~vlprompt.tta.ImageVariationGenerator`); its ``n_views`` is the number of
            generated views, ``n_views`` here the number of conventional ones (the mix).
        cache_dir: where generated views are cached (None: not cached).
        filter_on: cosine similarity on ``features`` (frozen image features) or ``logits``.
        filter_ratio: share of the filtered views kept.
        filter_scope: filter the ``generated`` views only, or ``all`` views but the original.
        Other arguments as for :class:`TestTimePromptTuning`.
    """

    _not_hyperparameters = (*TestTimePromptTuning._not_hyperparameters, "generator")

    def __init__(
        self,
        backbone: Backbone,
        prompt_learner: PromptLearnerFactory | None = None,
        classnames: list[str] | None = None,
        *,
        generator: ViewGenerator,
        cache_dir: str | None = "outputs/diffusion-views",
        n_views: int = 64,
        augmix: bool = False,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        crop_interpolation: Literal["bilinear", "backbone"] = "bilinear",
        filter_on: Literal["features", "logits"] = "features",
        filter_ratio: float = 0.8,
        filter_scope: Literal["generated", "all"] = "generated",
        selection_ratio: float = 0.3,
        steps: int = 4,
        optimizer: Callable[[Iterable[torch.nn.Parameter]], Optimizer] = _default_optimizer,
        init_prompt: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(
            backbone, prompt_learner, classnames, n_views=n_views, augmix=augmix, crop_scale=crop_scale,
            crop_interpolation=crop_interpolation,
            selection_ratio=selection_ratio, steps=steps, optimizer=optimizer, init_prompt=init_prompt, seed=seed,
        )
        if filter_on not in ("features", "logits"):
            raise ValueError(f"filter_on must be 'features' or 'logits', got {filter_on!r}")
        if filter_scope not in ("generated", "all"):
            raise ValueError(f"filter_scope must be 'generated' or 'all', got {filter_scope!r}")
        if not 0 < filter_ratio <= 1:
            raise ValueError(f"filter_ratio must be in (0, 1], got {filter_ratio}")
        self.generator, self.cache = generator, ViewCache(generator, cache_dir)
        self.filter_on, self.filter_ratio, self.filter_scope = filter_on, filter_ratio, filter_scope

    def view_transform(self) -> Callable:
        return DiffusionViews(super().view_transform(), self.cache, self.backbone.preprocess_cfg)

    def select_views(self, views: torch.Tensor, features: torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor:
        first = 1 if self.filter_scope == "all" else self.n_views
        if self.filter_on == "logits":
            embeddings = logits
        elif features is not None:
            embeddings = features
        else:
            with torch.no_grad():
                embeddings = self.backbone.encode_image(views)
        similar = similar_views(embeddings, torch.arange(first, len(views), device=views.device), self.filter_ratio)
        candidates = torch.cat([torch.arange(first, device=views.device), similar])
        return candidates[confident_views(logits[candidates], self.selection_ratio)]

    def on_test_end(self) -> None:
        super().on_test_end()
        self._log_cache()

    def on_predict_end(self) -> None:
        super().on_predict_end()
        self._log_cache()

    def _log_cache(self) -> None:
        log.info("diffusion views: %d images read from the cache, %d generated", self.cache.hits, self.cache.misses)
