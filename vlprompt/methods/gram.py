"""GRAM: gradient-regulated meta-prompt learning (Li et al., "Gradient-Regulated Meta-Prompt Learning
for Generalizable Vision-Language Models", ICCV 2023), for any prompt learner.

From unlabelled image-text pairs only, :class:`GRAMMetaLearner` meta-learns (a) a prompt
initialisation that adapts fast from few shots and (b) a gradient regulator
(:class:`~vlprompt.meta.GradientRegulator`) that keeps the adaptation general. Each episode
(:mod:`vlprompt.meta.episodes`: pseudo-classes from cross-modal hierarchical clustering, support and
query from different domains) runs ``inner_steps`` of SGD on the support loss, each step along the
*regulated* gradient, starting from the meta-prompt; the query loss of the adapted prompt updates the
meta-prompt and the regulator. The inner loop is functional over the prompt tensors only
(``torch.func.functional_call``); the encoder stays frozen. First-order by default (the inner
gradients are constants of the outer graph; the regulator still learns through the steps it shapes),
second-order with ``second_order=True`` (the outer gradient runs through the inner gradients too).
UNIGRAM is the same with a text+visual learner (IVLP: both prompts meta-learned together).

Downstream, any prompt learner starts from the saved meta-prompt (``init_prompt``) and
:class:`GradientRegulation` applies the frozen regulator to the prompt gradients before every
optimiser step. vlprompt's reading of what the paper leaves open is in the README's GRAM section.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from vlprompt.backbones import Backbone, check_backbone_identity
from vlprompt.data.protocol import EpisodeData
from vlprompt.meta.episodes import EpisodeSampler, cluster_pairs
from vlprompt.meta.regulator import GradientRegulator, load_regulator, save_regulator
from vlprompt.methods.checkpoints import (
    check_record,
    prompt_record,
    restore_frozen,
    strip_frozen,
)
from vlprompt.methods.scoring import prompt_logits
from vlprompt.prompts import (
    PromptLearner,
    PromptLearnerFactory,
    read_prompt_config,
    save_prompt,
)

__all__ = ["GRAMMetaLearner", "GradientRegulation"]

log = logging.getLogger(__name__)

Params = dict[str, torch.Tensor]


class GRAMMetaLearner(pl.LightningModule):
    """Meta-train a prompt initialisation and a gradient regulator (see the module docstring).

    Args:
        backbone: the frozen encoder.
        prompt_learner: factory ``(backbone, classnames) -> PromptLearner`` (CoOp, VPT, IVLP ...).
        n_way, k_shot, q_query: classes per episode, support shots and query shots per class.
        n_domains, classes_per_domain, min_class_size: the clustering of the pairs into domains and
            pseudo-classes (:func:`~vlprompt.meta.episodes.cluster_pairs`).
        inner_steps, inner_lr: SGD steps on the support set, and their learning rate.
        outer_lr, regulator_lr: Adam learning rates of the meta-prompt and of the regulator.
        second_order: differentiate through the inner gradients (exact meta-gradient; slower).
        regulate: meta-learn the regulator (else plain MAML-style meta-prompt learning).
        regulator_hidden: width of the regulator's MLP.
        seed: seeds the clustering and the episodes.
    """

    def __init__(
        self,
        backbone: Backbone,
        prompt_learner: PromptLearnerFactory,
        *,
        n_way: int = 5,
        k_shot: int = 4,
        q_query: int = 8,
        n_domains: int = 4,
        classes_per_domain: int = 16,
        min_class_size: int = 8,
        inner_steps: int = 5,
        inner_lr: float = 0.1,
        outer_lr: float = 2e-3,
        regulator_lr: float = 1e-3,
        second_order: bool = False,
        regulate: bool = True,
        regulator_hidden: int = 16,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["backbone", "prompt_learner"])
        self.backbone = backbone
        self.prompt_learner: PromptLearner = prompt_learner(backbone, [f"class {i}" for i in range(n_way)])
        self.regulator = GradientRegulator(regulator_hidden) if regulate else None
        if inner_steps < 1 or inner_lr <= 0:
            raise ValueError(f"need inner_steps >= 1 and inner_lr > 0, got {inner_steps}, {inner_lr}")
        #: Frozen image features of every pair (learners that leave the image tower alone).
        self.image_features: torch.Tensor | None = None
        self.sampler: EpisodeSampler | None = None

    # -- tasks -------------------------------------------------------------------------------------
    def episode_data(self) -> EpisodeData | None:
        """The trainer's data module (None without one), which must implement
        :class:`~vlprompt.data.protocol.EpisodeData`."""
        dm = self.trainer.datamodule
        if dm is not None and not isinstance(dm, EpisodeData):
            raise TypeError(f"GRAM meta-learns from image-text pairs: {type(dm).__name__} does not implement "
                            "vlprompt.data.protocol.EpisodeData (ImageTextPairsDataModule does)")
        return dm

    def setup(self, stage: str) -> None:
        dm = self.episode_data()
        if self.sampler is not None or dm is None:
            return
        dm.set_preprocess(self.backbone.preprocess_cfg)
        image_features, text_features = self.embed_pairs(dm.embedding_loader())
        h = self.hparams
        hierarchy = cluster_pairs(image_features, text_features, dm.captions, n_domains=h.n_domains,
                                  classes_per_domain=h.classes_per_domain, min_class_size=h.min_class_size, seed=h.seed)
        self.sampler = EpisodeSampler(hierarchy, h.n_way, h.k_shot, h.q_query, seed=h.seed)
        with_images = self.prompt_learner.uses_image_tower
        self.image_features = None if with_images else image_features
        dm.set_episodes(self.sampler, with_images=with_images)
        if dm.unreadable:
            log.warning("%d unreadable images skipped", dm.unreadable)

    @torch.no_grad()
    def embed_pairs(self, batches: Iterable[tuple[torch.Tensor, list[str]]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen image and caption features of every pair, in large no-grad batches."""
        device = self.backbone.device
        images, texts = [], []
        for pixels, captions in tqdm(batches, desc="embedding image-text pairs", unit="batch"):
            images.append(self.backbone.encode_image(pixels.to(device)).float().cpu())
            texts.append(self.backbone.encode_text(captions).float().cpu())
        return torch.cat(images), torch.cat(texts)

    def on_train_epoch_start(self) -> None:
        self.episode_data().set_epoch(self.current_epoch)

    def on_train_batch_start(self, batch: list[dict[str, Any]], batch_idx: int) -> None:
        stale = self.episode_data().remake_stale_episodes(batch, self.current_epoch)
        if stale:
            log.debug("redrew %d episodes fetched before epoch %d began", stale, self.current_epoch)

    # -- the functional inner loop -------------------------------------------------------------------
    def prompt_params(self) -> Params:
        """The learnable prompt tensors (the meta-prompt), by name."""
        return {k: p for k, p in self.prompt_learner.named_parameters() if p.requires_grad}

    def episode_loss(self, params: Params, episode: dict[str, Any], part: str) -> torch.Tensor:
        """Cross-entropy of the prompt ``params`` on the ``support`` or ``query`` part of ``episode``."""
        learner = self.prompt_learner
        learner.set_classnames(episode[f"{part}_names"])
        learner.to(self.device)  # new token buffers are made on the CPU
        if f"{part}_image" in episode:
            kwargs = {"images": episode[f"{part}_image"].to(self.device)}
        else:
            kwargs = {"image_features": self.image_features[episode[part]].to(self.device)}
        output = functional_call(learner, params, args=(), kwargs=kwargs, strict=False)
        return F.cross_entropy(prompt_logits(output, self.backbone), episode[f"{part}_labels"].to(self.device))

    def regulate(self, grad: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        return grad if self.regulator is None else self.regulator(grad, param)

    def adapt(self, params: Params, episode: dict[str, Any]) -> Params:
        """The prompt after ``inner_steps`` regulated SGD steps on the episode's support set."""
        second_order = self.hparams.second_order
        for _ in range(self.hparams.inner_steps):
            with torch.enable_grad():  # the inner gradients, also when adapting under no_grad
                params = {k: v if v.requires_grad else v.detach().requires_grad_() for k, v in params.items()}
                loss = self.episode_loss(params, episode, "support")
                grads = torch.autograd.grad(loss, list(params.values()), create_graph=second_order)
            params = {name: p - self.hparams.inner_lr * self.regulate(g, p)
                      for (name, p), g in zip(params.items(), grads)}
        return params

    def meta_loss(self, episodes: list[dict[str, Any]]) -> torch.Tensor:
        """Mean query loss after adaptation, over a batch of episodes."""
        start = self.prompt_params()
        # Second order differentiates attention twice: only the math kernel of SDPA can.
        with sdpa_kernel(SDPBackend.MATH) if self.hparams.second_order else nullcontext():
            losses = [self.episode_loss(self.adapt(start, ep), ep, "query") for ep in episodes]
        return torch.stack(losses).mean()

    # -- Lightning -------------------------------------------------------------------------------------
    def training_step(self, episodes: list[dict[str, Any]], batch_idx: int) -> torch.Tensor:
        loss = self.meta_loss(episodes)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"meta-loss is {loss.item()} at step {self.global_step}; lower inner_lr/outer_lr")
        self.log("meta/query_loss", loss.detach(), prog_bar=True, batch_size=len(episodes))
        if self.regulator is not None:
            self.log("meta/regulator_gate", torch.sigmoid(self.regulator.gate).detach(), batch_size=len(episodes))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        groups = [{"params": list(self.prompt_params().values()), "lr": self.hparams.outer_lr}]
        if self.regulator is not None:
            groups.append({"params": list(self.regulator.parameters()), "lr": self.hparams.regulator_lr})
        return torch.optim.Adam(groups)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        strip_frozen(checkpoint, ("backbone",))
        checkpoint["vlprompt"] = prompt_record(self.backbone, self.prompt_learner, full=False)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_record(checkpoint, self.backbone)
        restore_frozen(checkpoint, self, ("backbone",))

    def save_meta_prompt(self, directory: str | Path, *, overwrite: bool = False) -> Path:
        """Save the meta-prompt in vlprompt's prompt format (any learner of the same kind can start
        from it with ``init_prompt``), with ``regulator.safetensors`` beside it."""
        h = dict(self.hparams)
        directory = save_prompt(self.prompt_learner, directory, overwrite=overwrite, metadata={"gram": h})
        if self.regulator is not None:
            save_regulator(self.regulator, directory)
        return Path(directory)

    save_prompt = save_meta_prompt  # what `vlprompt fit` calls when fitting ends


class GradientRegulation(pl.Callback):
    """Apply a GRAM meta-prompt's frozen gradient regulator to the prompt gradients before every
    optimiser step (downstream few-shot tuning of any prompt learner).

    Args:
        meta_prompt: the directory saved by :meth:`GRAMMetaLearner.save_meta_prompt`, or
            ``zoo:MODEL/NAME`` for one shipped with an embedded model.
    """

    def __init__(self, meta_prompt: str) -> None:
        from vlprompt.zoo import resolve_prompt_dir

        self.meta_prompt = meta_prompt
        self.folder = resolve_prompt_dir(meta_prompt)
        self.regulator = load_regulator(self.folder)
        self.backbone = read_prompt_config(self.folder)["backbone"]

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_backbone_identity(self.backbone, pl_module.backbone.identity, what=f"gradient regulator {self.meta_prompt}")
        self.regulator.to(pl_module.device)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The regulator reshapes gradients and nothing else shows that it runs: say once which one.
        if trainer.is_global_zero:
            where = Path(self.folder).resolve()
            log.info("gradient regulation on: GRAM regulator %s (hidden %d, gate %.3f) from the meta-prompt %s%s, "
                     "applied to the prompt gradients before every optimiser step",
                     self.regulator.layout()["regulator"], self.regulator.hidden,
                     float(torch.sigmoid(self.regulator.gate)), where,
                     f" ({self.meta_prompt})" if str(self.meta_prompt) != str(where) else "")

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        self.regulator.to(pl_module.device)
        with torch.no_grad():
            for p in pl_module.prompt_learner.parameters():
                if p.grad is not None:
                    p.grad.copy_(self.regulator(p.grad.float(), p.detach().float()).to(p.grad.dtype))

