"""Real weights without internet, the way the README tells users to carry them: an open_clip
pretrained tag read from a copied Hugging Face cache (``HF_HOME``, ``HF_HUB_OFFLINE=1``), and a
transformers CLIP folder as ``hf:FOLDER``. Saved random models stand in for the real weights; the
loading code is the real one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import TINY_CLIP

ROOT = Path(__file__).resolve().parents[1]

# A tiny model config and a pretrained tag registered with open_clip (as its own tags are), whose
# weights live on the hub under REPO: what `OpenCLIPBackbone("ViT-B-16", "openai")` does, in small.
_SCRIPT = """
import json, sys
import open_clip
from open_clip import pretrained as registry
from vlprompt.backbones import OpenCLIPBackbone

config, out = sys.argv[1:3]
open_clip.add_model_config(config)
registry._PRETRAINED["vlprompt-offline-tiny"] = {"offline_tag": registry._pcfg(hf_hub="vlprompt-test/tiny-clip/")}
try:
    backbone = OpenCLIPBackbone("vlprompt-offline-tiny", pretrained="offline_tag")
except Exception as err:
    json.dump({"error": f"{type(err).__name__}: {err}"}, open(out, "w"))
else:
    json.dump({"identity": backbone.identity}, open(out, "w"))
"""
REPO, COMMIT = "vlprompt-test/tiny-clip", "0123456789abcdef0123456789abcdef01234567"


def _load_in_a_fresh_process(tmp_path: Path, hf_home: Path) -> dict:
    config = tmp_path / "vlprompt-offline-tiny.json"
    config.write_text(json.dumps(TINY_CLIP))
    script = tmp_path / "load.py"
    script.write_text(textwrap.dedent(_SCRIPT))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "PYTEST_XDIST_WORKER"):
        env.pop(name, None)
    done = subprocess.run([sys.executable, str(script), str(config), str(tmp_path / "out.json")], capture_output=True,
                          text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((tmp_path / "out.json").read_text())


@pytest.mark.slow
def test_a_pretrained_tag_loads_offline_from_a_copied_cache_and_says_what_to_do_when_missing(tmp_path, backbone):
    hf_home = tmp_path / "hf"
    missing = _load_in_a_fresh_process(tmp_path, hf_home)
    assert "error" in missing and "offline_tag" in missing["error"] and "HF_HOME" in missing["error"], missing

    # The Hugging Face cache layout a download leaves behind (copy ~/.cache/huggingface over).
    repo = hf_home / "hub" / f"models--{REPO.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    save_file({k: v.contiguous() for k, v in backbone.model.state_dict().items()},
              str(snapshot / "open_clip_model.safetensors"))
    loaded = _load_in_a_fresh_process(tmp_path, hf_home)
    assert "error" not in loaded, loaded
    assert loaded["identity"]["fingerprint"] == backbone.identity["fingerprint"]  # the cached weights, exactly


def test_a_transformers_clip_folder_loads_as_hf_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    from test_hf_clipseg import tiny_clip, write_clip_tokenizer
    from vlprompt.backbones import load_backbone

    model = tiny_clip()
    folder = tmp_path / "my-clip"
    model.save_pretrained(folder)
    write_clip_tokenizer(folder)
    transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    backbone = load_backbone(f"hf:{folder}")
    assert backbone.identity["name"] == f"hf:{folder}"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        own = model.get_image_features(pixel_values=x)
        own = own if isinstance(own, torch.Tensor) else own.pooler_output
        # the same model and input through another code path: float32 rounding only
        torch.testing.assert_close(backbone.encode_image(x), own, atol=1e-5, rtol=1e-5)
