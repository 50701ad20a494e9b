"""``TestTimePromptTuning``: TPT, episodic prompt tuning on each test image without labels."""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from vlprompt.backbones import Backbone
from vlprompt.methods.classifier import PromptClassifier
from vlprompt.prompts import CoOpPromptLearner, PromptLearnerFactory
from vlprompt.tta.views import TestTimeViews, confident_views, marginal_entropy

__all__ = ["TestTimePromptTuning"]

log = logging.getLogger(__name__)


def _default_optimizer(params: Iterable[torch.nn.Parameter]) -> Optimizer:
    # TPT's recipe: AdamW, lr 5e-3.
    return torch.optim.AdamW(params, lr=5e-3)


class TestTimePromptTuning(PromptClassifier):
    """Test-Time Prompt Tuning (Shu et al., NeurIPS 2022, "Test-Time Prompt Tuning for Zero-Shot
    Generalization in Vision-Language Models"), used with ``trainer.test``/``trainer.predict``.

    For every test image, independently: reset the prompt *and* the optimiser state, build
    ``n_views`` views (the original plus random views, in one batch), keep the
    ``selection_ratio`` most confident (lowest-entropy) views, take ``steps`` optimiser steps on
    the entropy of their averaged prediction, then classify the original image.

    The trainer must run with ``inference_mode=False`` (Lightning's default would forbid the
    gradient steps).

    Args:
        backbone: the frozen encoder.
        prompt_learner: factory ``(backbone, classnames) -> PromptLearner``; TPT's 4 context
            tokens from "a photo of a" when None.
        classnames: class names by label.
        n_views: views per image, the original included (64 in the paper).
        augmix: AugMix on the random views (the paper does so except on ImageNet and variants).
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
        selection_ratio: float = 0.1,
        steps: int = 1,
        optimizer: Callable[[Iterable[torch.nn.Parameter]], Optimizer] = _default_optimizer,
        init_prompt: str | None = None,
        seed: int = 0,
    ) -> None:
        factory = prompt_learner or functools.partial(CoOpPromptLearner, n_ctx=4, ctx_init="a photo of a")
        super().__init__(backbone, factory, classnames, optimizer=optimizer, init_prompt=init_prompt)
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        self.n_views, self.augmix, self.seed = n_views, augmix, seed
        self.selection_ratio, self.steps = selection_ratio, steps
        self._episode_start: tuple[dict[str, torch.Tensor], dict[str, Any], Optimizer] | None = None

    # -- views come from the data module ------------------------------------------------------
    def setup(self, stage: str) -> None:
        super().setup(stage)
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "set_eval_transform"):
            raise ValueError("TestTimePromptTuning needs a data module with set_eval_transform (e.g. FewShotDataModule)")
        dm.set_eval_transform(TestTimeViews(self.backbone.preprocess_cfg, self.n_views, self.augmix, self.seed))

    def teardown(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "set_eval_transform"):
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

    def adapt_and_predict(self, views: torch.Tensor) -> torch.Tensor:
        """Run one TPT episode on the views of one image (``views[0]`` is the original) and
        return the logits of the original image with the adapted prompt, ``[C]``."""
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
        if self.steps:
            with torch.enable_grad():
                with torch.no_grad():
                    keep = confident_views(self._episode_logits(views, features), self.selection_ratio)
                kept_views = views[keep]
                kept_features = features[keep] if features is not None else None
                for _ in range(self.steps):
                    loss = marginal_entropy(self._episode_logits(kept_views, kept_features))
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
        with torch.no_grad():
            return self._episode_logits(views[:1], features[:1] if features is not None else None)[0]

    def _tta_step(self, batch: dict[str, Any]) -> torch.Tensor | None:
        self.skipped_images += int(batch.get("skipped", 0))
        if batch["image"] is None:
            return None
        images = batch["image"]
        if images.dim() != 5:
            raise ValueError(f"expected views [B, n_views, 3, H, W], got {tuple(images.shape)}")
        return torch.stack([self.adapt_and_predict(views) for views in images])

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        logits = self._tta_step(batch)
        if logits is None:
            return
        labels = batch["label"]
        self.test_acc(logits.argmax(-1), labels)
        self.test_per_class.update(logits.argmax(-1), labels)
        self.log("test/acc", self.test_acc, on_step=False, on_epoch=True, batch_size=len(labels))

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor] | None:
        logits = self._tta_step(batch)
        if logits is None:
            return None
        confidence, prediction = logits.softmax(-1).max(-1)
        return {"index": batch["index"], "prediction": prediction, "confidence": confidence}

    def on_test_start(self) -> None:
        super().on_test_start()
        self._episode_start = None  # classes may have changed: snapshot the prompt afresh

    def on_predict_start(self) -> None:
        super().on_predict_start()
        self._episode_start = None

    # The adapted prompt belongs to the last image only; leave the starting prompt behind.
    def on_test_end(self) -> None:
        self._restore_start()

    def on_predict_end(self) -> None:
        self._restore_start()

    def _restore_start(self) -> None:
        if self._episode_start is not None:
            self.prompt_learner.load_state_dict(self._episode_start[0])
