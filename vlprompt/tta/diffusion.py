"""Diffusion-generated views of a test image, as in DiffTPT (Feng et al., ICCV 2023, "Diverse
Data Augmentation with Diffusions for Effective Test-time Prompt Tuning"), and their disk cache.

Two generators:

* :class:`ImageVariationGenerator`: Stable Diffusion image variations
  (``StableDiffusionImageVariationPipeline``), DiffTPT's generator: new images conditioned on the
  CLIP image embedding of the test image.
* :class:`SDEditGenerator`: partial noising and denoising (Meng et al., ICLR 2022, "SDEdit:
  Guided Image Synthesis and Editing with Stochastic Differential Equations") with any
  unconditional diffusers ``UNet2DModel`` and scheduler, in pixel space or in a VAE's latent space.

Every generated view has its own seed, drawn from the image's pixels, the view's index and the
generator seed, so a view never depends on which other images share its batch (for deterministic
samplers such as DDIM, PNDM or DPM-Solver). :class:`ViewCache` keeps generated views on disk,
keyed by the image's pixels and every setting that changes the output, so re-runs and sweeps
over other TTA settings never regenerate.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vlprompt.data.images import build_eval_transform
from vlprompt.tta.views import TestTimeViews

__all__ = [
    "DiffusionViews",
    "ImageVariationGenerator",
    "SDEditGenerator",
    "ViewCache",
    "ViewGenerator",
    "image_digest",
    "resolve_diffusion_model",
    "module_fingerprint",
]

log = logging.getLogger(__name__)


def image_digest(image: Image.Image) -> str:
    """SHA-256 of an image's decoded pixels (mode, size and bytes), whatever file it came from."""
    digest = hashlib.sha256(f"{image.mode}:{image.size}:".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def module_fingerprint(module: torch.nn.Module) -> str:
    """A cheap identity of a model's weights: its config and a strided sample of every tensor.
    Two checkpoints of one architecture (a fine-tune, another seed) get different fingerprints."""
    config = getattr(module, "config", {})
    config = config.to_dict() if hasattr(config, "to_dict") else dict(config)  # transformers or diffusers
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in module.state_dict().items():
        flat = tensor.detach().flatten()
        sample = flat[:: max(1, flat.numel() // 64)][:64].float().cpu().numpy()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(sample.tobytes())
    return digest.hexdigest()[:16]


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _dtype(name: str | torch.dtype | None, device: str) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name is None:
        return torch.float16 if device.startswith("cuda") else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def _seeded(seeds: list[int]) -> list[torch.Generator]:
    # CPU generators: the same noise on any device.
    return [torch.Generator().manual_seed(s) for s in seeds]


def _place(module: Any, device: str, dtype: torch.dtype) -> Any:
    """Move a diffusers model or pipeline; cast only when needed (diffusers warns on every cast)."""
    module = module.to(device)
    if getattr(module, "dtype", dtype) != dtype:
        module = module.to(dtype=dtype)
    return module


def resolve_diffusion_model(path: str) -> str:
    """``zoo:NAME`` -> the embedded diffusers folder; other paths and hub ids pass through."""
    from vlprompt.zoo import diffusion_model_dir

    return str(diffusion_model_dir(path)) if path.startswith("zoo:") else path


class ViewGenerator(ABC):
    """Makes ``n_views`` images from one image, ``batch_size`` images per forward pass.

    Subclasses implement :meth:`_generate` over a flat batch of (image, seed) pairs and
    :meth:`settings`, which must name everything that changes the output: the cache key is built
    from it.
    """

    def __init__(self, n_views: int, batch_size: int, seed: int) -> None:
        if n_views < 1:
            raise ValueError(f"n_views must be >= 1, got {n_views}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.n_views, self.batch_size, self.seed = n_views, batch_size, seed

    @abstractmethod
    def settings(self) -> dict[str, Any]:
        """JSON-serialisable settings that determine the generated images (model identity too)."""

    @abstractmethod
    def _generate(self, images: list[Image.Image], seeds: list[int]) -> list[Image.Image]:
        """One generated image per (image, seed) pair."""

    def view_seeds(self, image: Image.Image) -> list[int]:
        """The seeds of an image's views: from its pixels, the view index and ``seed``."""
        base = int(image_digest(image)[:15], 16)
        return [(base + 1_000_003 * (self.seed + 1) + v) % 2**63 for v in range(self.n_views)]

    @torch.no_grad()
    def generate(self, images: Sequence[Image.Image]) -> list[list[Image.Image]]:
        """``n_views`` generated images for each of ``images``, in batches of ``batch_size``."""
        jobs = [(i, image, s) for i, image in enumerate(images) for s in self.view_seeds(image)]
        views: list[list[Image.Image]] = [[] for _ in images]
        for start in range(0, len(jobs), self.batch_size):
            chunk = jobs[start : start + self.batch_size]
            outputs = self._generate([image for _, image, _ in chunk], [s for _, _, s in chunk])
            for (i, _, _), output in zip(chunk, outputs):
                views[i].append(output)
        return views


class ImageVariationGenerator(ViewGenerator):
    """Stable Diffusion image variations, the generator of DiffTPT.

    Args:
        model: a diffusers ``StableDiffusionImageVariationPipeline`` or its path / hub id (e.g.
            ``lambdalabs/sd-image-variations-diffusers``: a local folder, or a hub id already in
            the Hugging Face cache when offline).
        n_views: images generated per test image.
        steps: denoising steps.
        guidance_scale: classifier-free guidance on the image embedding.
        size: output height and width (the pipeline's default when None).
        batch_size: generated images per forward pass.
        device, dtype: where and in which precision to run (CUDA and float16 when available).
        seed: seed of the generation noise (mixed with each image's pixels).
    """

    def __init__(
        self,
        model: Any,
        *,
        n_views: int = 8,
        steps: int = 50,
        guidance_scale: float = 3.0,
        size: int | None = None,
        batch_size: int = 8,
        device: str | None = None,
        dtype: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(n_views, batch_size, seed)
        from diffusers import StableDiffusionImageVariationPipeline

        self.device = device or _default_device()
        self.dtype = _dtype(dtype, self.device)
        if isinstance(model, str):
            model = StableDiffusionImageVariationPipeline.from_pretrained(
                resolve_diffusion_model(model), torch_dtype=self.dtype, safety_checker=None, requires_safety_checker=False
            )
        self.pipeline = _place(model, self.device, self.dtype)
        self.pipeline.set_progress_bar_config(disable=True)
        self.steps, self.guidance_scale, self.size = steps, guidance_scale, size
        self._fingerprint = "".join(
            module_fingerprint(part) for part in (self.pipeline.unet, self.pipeline.image_encoder, self.pipeline.vae)
        )

    def settings(self) -> dict[str, Any]:
        return {
            "generator": "image_variation",
            "model": self._fingerprint,
            "scheduler": dict(self.pipeline.scheduler.config) | {"class": type(self.pipeline.scheduler).__name__},
            "n_views": self.n_views,
            "steps": self.steps,
            "guidance_scale": self.guidance_scale,
            "size": self.size,
            "dtype": str(self.dtype),
            "seed": self.seed,
        }

    def _generate(self, images: list[Image.Image], seeds: list[int]) -> list[Image.Image]:
        return self.pipeline(
            image=images,
            height=self.size,
            width=self.size,
            num_inference_steps=self.steps,
            guidance_scale=self.guidance_scale,
            generator=_seeded(seeds),
            output_type="pil",
        ).images


class SDEditGenerator(ViewGenerator):
    """Image-to-image by partial noising and denoising (SDEdit) with an unconditional diffusers
    ``UNet2DModel`` and any scheduler: the test image is noised up to ``strength`` of the
    schedule and denoised back, which keeps its layout and redraws its details in the style the
    model learned. With a ``vae`` the same happens in its latent space.

    Args:
        model: a ``UNet2DModel``, or a diffusers pipeline folder / hub id with ``unet/`` and
            ``scheduler/`` (and ``vae/`` when latent), or ``zoo:shapeworld-ddpm-tiny``.
        scheduler: a diffusers scheduler; by default DDIM built from the model's own scheduler
            config (deterministic, so views do not depend on batching).
        vae: an ``AutoencoderKL`` for latent models (loaded from the folder when it has one).
        n_views: images generated per test image.
        steps: denoising steps of the full schedule; ``strength * steps`` of them are run.
        strength: how far to noise, from 0 (the image itself) to 1 (a new sample).
        size: generation size (the UNet's ``sample_size``, times the VAE's factor, when None).
        batch_size: generated images per forward pass.
        device, dtype: where and in which precision to run (CUDA and float16 when available).
        seed: seed of the noise (mixed with each image's pixels).
    """

    def __init__(
        self,
        model: Any,
        *,
        scheduler: Any = None,
        vae: Any = None,
        n_views: int = 8,
        steps: int = 20,
        strength: float = 0.5,
        size: int | None = None,
        batch_size: int = 32,
        device: str | None = None,
        dtype: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(n_views, batch_size, seed)
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DModel

        if not 0 <= strength <= 1:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.device = device or _default_device()
        self.dtype = _dtype(dtype, self.device)
        if isinstance(model, str):
            path = resolve_diffusion_model(model)
            model = UNet2DModel.from_pretrained(path, subfolder="unet", torch_dtype=self.dtype)
            if scheduler is None:
                scheduler = DDIMScheduler.from_pretrained(path, subfolder="scheduler")
            if vae is None and _has_subfolder(path, "vae"):
                vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=self.dtype)
        if not isinstance(model, UNet2DModel):
            raise TypeError(
                f"SDEditGenerator needs an unconditional diffusers UNet2DModel, got {type(model).__name__}; "
                "for Stable Diffusion use ImageVariationGenerator"
            )
        if scheduler is None:
            raise ValueError("SDEditGenerator needs a scheduler when the model is passed as a module")
        self.unet = _place(model, self.device, self.dtype).eval()
        self.vae = _place(vae, self.device, self.dtype).eval() if vae is not None else None
        self.scheduler = scheduler
        self.steps, self.strength = steps, strength
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1
        sample = self.unet.config.sample_size
        self.size = size or (sample if isinstance(sample, int) else sample[0]) * factor
        self._fingerprint = module_fingerprint(self.unet) + (module_fingerprint(self.vae) if self.vae else "")

    def settings(self) -> dict[str, Any]:
        return {
            "generator": "sdedit",
            "model": self._fingerprint,
            "scheduler": dict(self.scheduler.config) | {"class": type(self.scheduler).__name__},
            "n_views": self.n_views,
            "steps": self.steps,
            "strength": self.strength,
            "size": self.size,
            "dtype": str(self.dtype),
            "seed": self.seed,
        }

    def _to_tensor(self, images: list[Image.Image]) -> torch.Tensor:
        arrays = [np.asarray(_square(image, self.size), dtype=np.float32) for image in images]
        pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0
        return pixels.to(self.device, self.dtype)

    def _generate(self, images: list[Image.Image], seeds: list[int]) -> list[Image.Image]:
        n_run = min(int(round(self.steps * self.strength)), self.steps)
        if n_run == 0:
            return [_square(image, self.size) for image in images]
        pixels = self._to_tensor(images)
        self.scheduler.set_timesteps(self.steps)
        begin = (self.steps - n_run) * self.scheduler.order
        timesteps = self.scheduler.timesteps[begin:]
        if hasattr(self.scheduler, "set_begin_index"):  # multistep solvers count their steps from here
            self.scheduler.set_begin_index(begin)
        x = pixels
        if self.vae is not None:
            x = self.vae.encode(pixels).latent_dist.mean * self.vae.config.scaling_factor
        noise = torch.stack([torch.randn(x.shape[1:], generator=g) for g in _seeded(seeds)])
        x = self.scheduler.add_noise(x, noise.to(x.device, x.dtype), timesteps[:1].repeat(len(x)))
        for t in timesteps:
            model_input = self.scheduler.scale_model_input(x, t)
            x = self.scheduler.step(self.unet(model_input, t).sample, t, x).prev_sample
        if self.vae is not None:
            x = self.vae.decode(x / self.vae.config.scaling_factor).sample
        array = ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(a, mode="RGB") for a in array]


def _has_subfolder(path: str, name: str) -> bool:
    index = Path(path) / "model_index.json"
    return index.is_file() and name in json.loads(index.read_text())


def _square(image: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to ``size`` and centre-crop to a square."""
    w, h = image.size
    scale = size / min(w, h)
    resized = image.convert("RGB").resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BICUBIC)
    left, top = (resized.width - size) // 2, (resized.height - size) // 2
    return resized.crop((left, top, left + size, top + size))


class ViewCache:
    """Generated views on disk, keyed by the image's pixels and the generator's settings.

    Layout: ``root/<key[:2]>/<key>/{00,01,...}.png`` with ``settings.json`` next to the views.
    Entries are written to a temporary folder and renamed into place, so an interrupted run
    never leaves a half-written entry behind. Without a ``root`` nothing is stored.
    """

    def __init__(self, generator: ViewGenerator, root: str | Path | None = None) -> None:
        self.generator = generator
        self.root = Path(root).expanduser() if root is not None else None
        self._settings = json.dumps(generator.settings(), sort_keys=True, default=str)
        self._settings_digest = hashlib.sha256(self._settings.encode()).hexdigest()
        self.hits = self.misses = 0

    def key(self, image: Image.Image) -> str:
        """The cache key of an image's views: its pixels and every generator setting."""
        return hashlib.sha256(f"{image_digest(image)}:{self._settings_digest}".encode()).hexdigest()

    def _entry(self, key: str) -> Path:
        assert self.root is not None
        return self.root / key[:2] / key

    def load(self, image: Image.Image) -> list[Image.Image] | None:
        """Cached views of ``image``, or None."""
        if self.root is None:
            return None
        entry = self._entry(self.key(image))
        paths = [entry / f"{v:02d}.png" for v in range(self.generator.n_views)]
        if not all(p.is_file() for p in paths):
            return None
        views = []
        for path in paths:
            with Image.open(path) as view:
                views.append(view.convert("RGB"))
        return views

    def save(self, image: Image.Image, views: Sequence[Image.Image]) -> None:
        if self.root is None:
            return
        entry = self._entry(self.key(image))
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=".tmp-"))
        try:
            for v, view in enumerate(views):
                view.save(tmp / f"{v:02d}.png")
            (tmp / "settings.json").write_text(self._settings + "\n")
            if entry.exists():  # written meanwhile by another process: same content
                shutil.rmtree(tmp)
            else:
                os.replace(tmp, entry)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def views(self, images: Sequence[Image.Image]) -> list[list[Image.Image]]:
        """Views of every image: cached ones read back, the others generated in one batched
        pass and stored."""
        found = [self.load(image) for image in images]
        missing = [i for i, views in enumerate(found) if views is None]
        self.hits += len(images) - len(missing)
        self.misses += len(missing)
        if missing:
            generated = self.generator.generate([images[i] for i in missing])
            for i, views in zip(missing, generated):
                self.save(images[i], views)
                found[i] = views
        return found  # type: ignore[return-value]

    def pregenerate(self, images: Iterable[Image.Image], batch_images: int = 8) -> None:
        """Fill the cache for ``images``, ``batch_images`` test images per generation call."""
        pending: list[Image.Image] = []
        for image in images:
            pending.append(image)
            if len(pending) == batch_images:
                self.views(pending)
                pending = []
        if pending:
            self.views(pending)


class DiffusionViews:
    """Views of a test image for DiffTPT: the conventional views of :class:`TestTimeViews` (the
    original first) followed by the generator's views, each through the backbone's evaluation
    preprocessing. Returns ``[n_conventional + n_generated, 3, H, W]``."""

    def __init__(self, conventional: TestTimeViews, cache: ViewCache, preprocess_cfg: dict[str, Any]) -> None:
        self.conventional, self.cache = conventional, cache
        self.preprocess: Callable = build_eval_transform(preprocess_cfg)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        generated = self.cache.views([image])[0]
        return torch.cat([self.conventional(image), torch.stack([self.preprocess(v) for v in generated])])
