"""Embedded default models that ship inside the package, so everything runs offline.

Each CLIP model is a folder in this package with ``open_clip_config.json`` and
``open_clip_model.safetensors`` (open_clip's ``local-dir:`` format) plus ``BUILD.json``
recording how ``tools/build_embedded_model.py`` made it. Diffusion models (for DiffTPT) are
diffusers pipeline folders (``model_index.json``, ``unet/``, ``scheduler/``) made by
``tools/build_diffusion_model.py``. Refer to either as ``zoo:NAME``.

A CLIP model may borrow a tower of another embedded model instead of shipping a copy:
``shapeworld-cris-tiny`` (a ResNet image tower, ``tools/build_embedded_cris.py``) uses the text
tower of ``shapeworld-clip-tiny``. Its folder names the lender in ``shared_towers.json`` and its
``open_clip_model.safetensors`` holds only its own weights; :func:`shared_tower_weights` puts the
two together (``OpenCLIPBackbone("zoo:shapeworld-cris-tiny")`` does it; open_clip alone cannot
load that folder).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = [
    "CRIS_BUILD_FILE",
    "CRIS_HEAD_FILE",
    "DECODER_BUILD_FILE",
    "DECODER_FILE",
    "SHARED_TOWERS_FILE",
    "ZOO_DIR",
    "available_models",
    "decoder_weights_path",
    "diffusion_model_dir",
    "model_dir",
    "prompt_file",
    "resolve_model_name",
    "shared_tower_weights",
]

ZOO_DIR = Path(__file__).resolve().parent
_PREFIX = "zoo:"
#: A CLIP model's segmentation head (``tools/build_embedded_vlsm.py``), next to its weights.
DECODER_FILE = "clipseg_decoder.safetensors"
DECODER_BUILD_FILE = "CLIPSEG_BUILD.json"
#: CRIS's head trained for a ResNet CLIP (``tools/build_embedded_cris.py``), next to its weights.
CRIS_HEAD_FILE = "cris_head.safetensors"
CRIS_BUILD_FILE = "CRIS_BUILD.json"
#: Names the embedded models whose towers a model borrows (``{"text": "shapeworld-clip-tiny"}``).
SHARED_TOWERS_FILE = "shared_towers.json"
_WEIGHTS_FILE = "open_clip_model.safetensors"


def available_models() -> list[str]:
    """Names of the embedded models (usable as ``zoo:NAME``)."""
    return sorted(p.parent.name for p in ZOO_DIR.glob("*/open_clip_config.json"))


def model_dir(name: str) -> Path:
    """Folder of the embedded model ``name`` (with or without the ``zoo:`` prefix)."""
    name = name.removeprefix(_PREFIX)
    path = ZOO_DIR / name
    if not (path / "open_clip_config.json").is_file():
        raise FileNotFoundError(
            f"No embedded model {name!r} in {ZOO_DIR}. Available: {available_models() or 'none'}. "
            "Build it with `python tools/build_embedded_model.py`."
        )
    return path


def resolve_model_name(model_name: str) -> str:
    """Turn ``zoo:NAME`` into open_clip's ``local-dir:`` form; leave other names alone."""
    if model_name.startswith(_PREFIX):
        return f"local-dir:{model_dir(model_name)}"
    return model_name


def diffusion_model_dir(name: str) -> Path:
    """Folder of the embedded diffusers pipeline ``name`` (with or without the ``zoo:`` prefix)."""
    name = name.removeprefix(_PREFIX)
    path = ZOO_DIR / name
    if not (path / "model_index.json").is_file():
        found = sorted(p.parent.name for p in ZOO_DIR.glob("*/model_index.json"))
        raise FileNotFoundError(
            f"No embedded diffusion model {name!r} in {ZOO_DIR}. Available: {found or 'none'}. "
            "Build it with `python tools/build_diffusion_model.py`."
        )
    return path


def decoder_weights_path(name: str) -> Path:
    """The segmentation head trained for the embedded CLIP model ``name`` (``zoo:`` prefix optional):
    its CLIPSeg-style decoder or its CRIS head."""
    folder = model_dir(name)
    for file in (DECODER_FILE, CRIS_HEAD_FILE):
        if (folder / file).is_file():
            return folder / file
    raise FileNotFoundError(f"{name} has no segmentation head ({folder / DECODER_FILE}); build it with "
                            "`python tools/build_embedded_vlsm.py` (or tools/build_embedded_cris.py)")


def shared_tower_weights(model_name: str) -> dict[str, Any] | None:
    """The whole state dict of an embedded model that borrows towers of others (its own weights
    and, for ``"text"``, every non-visual weight of the lender except ``logit_scale``); None for
    any other model name."""
    if not model_name.startswith(_PREFIX):
        return None
    folder = model_dir(model_name)
    spec = folder / SHARED_TOWERS_FILE
    if not spec.is_file():
        return None
    import json

    from safetensors.torch import load_file

    state = load_file(str(folder / _WEIGHTS_FILE))
    for tower, lender in json.loads(spec.read_text()).items():
        if tower != "text":
            raise ValueError(f"{spec}: only a text tower can be borrowed, not {tower!r}")
        theirs = load_file(str(model_dir(lender) / _WEIGHTS_FILE))
        state.update({k: v for k, v in theirs.items() if not k.startswith("visual.") and k != "logit_scale"})
    return state


def resolve_prompt_dir(path: str | Path) -> Path:
    """A saved prompt's folder: ``zoo:MODEL/NAME`` names one shipped with an embedded model (GRAM
    meta-prompts, ``zoo:shapeworld-clip-tiny/gram-coop``); anything else is a path."""
    text = str(path)
    if not text.startswith(_PREFIX):
        return Path(path)
    model, _, name = text.removeprefix(_PREFIX).partition("/")
    folder = model_dir(model) / name
    if not name or not folder.is_dir():
        shipped = sorted(p.parent.name for p in model_dir(model).glob("*/config.json"))
        raise FileNotFoundError(f"no prompt {text!r} ships with the embedded model {model!r}; shipped: {shipped or 'none'}")
    return folder


def prompt_file(prompt: str | Path | None, name: str) -> Path | None:
    """The file ``name`` saved next to a prompt (in its folder, :func:`resolve_prompt_dir`); None
    without a prompt, when the prompt is a file (a Dassl checkpoint) or the file is absent."""
    if not prompt:
        return None
    path = resolve_prompt_dir(prompt) / name
    return path if path.is_file() else None


def tensors_sha256(path: str | Path) -> str:
    """SHA-256 of a safetensors file's tensors (names, shapes, dtypes, bytes), what the build tools
    record: the file's header lists its metadata in no fixed order, so two identical builds may
    differ in their bytes but not in this."""
    import hashlib

    from safetensors.torch import load_file

    h = hashlib.sha256()
    for name, tensor in sorted(load_file(str(path)).items()):
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        h.update(tensor.contiguous().numpy().tobytes())
    return h.hexdigest()
