"""The CLIPSeg-style decoder over a prompted backbone: shapes, conditioning, gradients."""

from __future__ import annotations

import pytest
import torch

from vlprompt.seg.decoder import CLIPSegDecoder, default_extract_layers


def test_default_layers_are_clipsegs_on_twelve_blocks():
    assert default_extract_layers(12) == [2, 5, 8]  # CLIPSeg reads blocks 3, 6 and 9 (1-based)
    assert default_extract_layers(3) == [0, 1]


def test_mask_logits_follow_the_text_and_train_the_decoder_only(backbone):
    torch.manual_seed(0)
    decoder = CLIPSegDecoder.for_backbone(backbone, reduce_dim=16, n_heads=2)
    images = torch.randn(2, 3, 32, 32)
    layers = backbone.encode_image_layers(images, decoder.extract_layers)
    text = backbone.encode_text(["a red square", "a blue circle"])
    logits = decoder(layers, text, backbone.vision_prefix_tokens, (32, 32))
    assert logits.shape == (2, 1, 32, 32)
    swapped = decoder(layers, text.flip(0), backbone.vision_prefix_tokens, (32, 32))
    assert not torch.allclose(logits, swapped)  # the prompt decides the mask
    logits.sum().backward()
    assert all(p.grad is not None for p in decoder.parameters())
    assert all(p.grad is None for p in backbone.parameters())  # the frozen encoder stays frozen
    with pytest.raises(ValueError, match="do not tile"):
        decoder(layers, text, backbone.vision_prefix_tokens, (40, 32))
