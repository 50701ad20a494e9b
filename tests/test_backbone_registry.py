"""The one backbone registry: ``load_backbone`` and a saved prompt's backbone identity go through the
same families; a new family is its own class plus one registration line."""

from __future__ import annotations

import pytest
import torch

from conftest import make_backbone
from vlprompt.backbones import (
    Backbone,
    HFCLIPBackbone,
    OpenCLIPBackbone,
    TimmBackbone,
    backbone_families,
    backbone_from_identity,
    load_backbone,
    register_backbone,
)
from vlprompt.backbones import registry
from vlprompt.prompts.io import backbone_from_identity as prompt_backbone_from_identity


def test_every_family_is_registered_once():
    families = backbone_families()
    assert {name: f.cls for name, f in families.items()} == {
        "open_clip": OpenCLIPBackbone, "hf_clip": HFCLIPBackbone, "timm": TimmBackbone}
    assert [f.name for f in families.values() if f.prefix is None] == ["open_clip"]


def test_load_backbone_picks_the_family_by_prefix():
    assert type(load_backbone("zoo:shapeworld-clip-tiny")) is OpenCLIPBackbone
    timm = load_backbone("timm:vit_tiny_patch16_224")
    assert type(timm) is TimmBackbone and timm.model_name == "vit_tiny_patch16_224" and timm.text_tower is None
    with pytest.raises(ValueError, match="brings its own weights"):
        load_backbone("hf:some/model", "openai")


def test_a_saved_identity_rebuilds_the_same_backbone(tmp_path):
    backbone = make_backbone(tmp_path, seed=0)  # a config folder, random weights: compare all but them

    def shape(b):
        return {k: v for k, v in b.identity.items() if k != "fingerprint"}

    rebuilt = backbone_from_identity(backbone.identity)
    assert type(rebuilt) is OpenCLIPBackbone and shape(rebuilt) == shape(backbone)
    # prompts/io.py goes through the same registry
    assert shape(prompt_backbone_from_identity(backbone.identity)) == shape(backbone)
    # the first saved prompts recorded no type: open_clip
    untyped = {k: v for k, v in backbone.identity.items() if k != "type"}
    assert type(backbone_from_identity(untyped)) is OpenCLIPBackbone


def test_unknown_or_incomplete_identities_are_clear_errors():
    with pytest.raises(ValueError, match="cannot rebuild a 'NoSuchBackbone' backbone"):
        backbone_from_identity({"type": "NoSuchBackbone", "name": "x"})
    with pytest.raises(ValueError, match="does not record its backbone's model name"):
        backbone_from_identity({"type": "TimmBackbone"})


class _ToyBackbone(Backbone):
    """A stand-in family: records how it was asked for."""

    def __init__(self, name: str, pretrained: str | None = None) -> None:
        super().__init__()
        self.model_name, self.pretrained = name, pretrained
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def encode_image(self, images, visual_prompts=None, placement="after_cls"):
        return images.flatten(1)

    logit_scale = property(lambda self: torch.ones(()))
    preprocess_cfg = property(lambda self: {})
    identity = property(lambda self: {"type": "_ToyBackbone", "name": self.model_name, "pretrained": self.pretrained})


@pytest.fixture()
def toy_family():
    register_backbone("toy", _ToyBackbone, prefix="toy:")
    yield
    registry._FAMILIES.pop("toy")


def test_a_new_family_is_one_registration_line(toy_family):
    toy = load_backbone("toy:small", "v1")
    assert type(toy) is _ToyBackbone and (toy.model_name, toy.pretrained) == ("toy:small", "v1")
    again = backbone_from_identity(toy.identity)
    assert type(again) is _ToyBackbone and again.model_name == "toy:small"
    assert not toy.has_text
    with pytest.raises(NotImplementedError, match="vision-only backbone"):
        toy.tokenize(["cat"])
    with pytest.raises(ValueError, match="already taken"):
        register_backbone("toy2", _ToyBackbone, prefix="other:")
    with pytest.raises(ValueError, match="already taken"):
        register_backbone("toy3", type("Other", (), {}), prefix="toy:")
