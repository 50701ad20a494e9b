"""Runner configs: typed dataclasses read by jsonargparse, overrides of any key from the command
line (dotted for nested keys), ``--print_config``, and the one-line errors of each."""

from __future__ import annotations

import pytest
import yaml

from vlprompt.apps.fewshot import EvaluationConfig, load_eval_config
from vlprompt.apps.runner import CommandParser, with_overrides
from vlprompt.cli import main
from vlprompt.resources import bundled_dir

DEMO = bundled_dir("configs") / "eval" / "shapeworld_demo.yaml"


def test_the_parser_collects_overrides_as_key_value_pairs(capsys):
    parser = CommandParser(prog="vlprompt x", overrides=True)
    parser.add_argument("--shots", type=int, nargs="*")
    args = parser.parse_args(["--trainer.max_epochs", "3", "--shots", "1", "2", "--transfer.shots=8", "--save_prompts", "true"])
    assert args.shots == [1, 2] and not args.print_config
    assert args.overrides == ["--trainer.max_epochs=3", "--transfer.shots=8", "--save_prompts=true"]
    for bad, said in ((["--trainer.max_epochs"], "--trainer.max_epochs: give a value"), (["stray"], "unrecognized arguments: stray")):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
        assert said in capsys.readouterr().err


def test_overrides_set_nested_keys_with_yaml_values():
    raw = {"backbone": {"class_path": "B", "init_args": {"model_name": "m"}}, "shots": [1], "transfer": None}
    out = with_overrides(raw, ["--backbone.init_args.pretrained=openai", "--shots=[2, 4]", "--transfer.shots=8",
                               "--trainer.max_epochs=3", "--zeroshot=null"])
    assert out == {"backbone": {"class_path": "B", "init_args": {"model_name": "m", "pretrained": "openai"}}, "shots": [2, 4],
                   "transfer": {"shots": 8}, "trainer": {"max_epochs": 3}, "zeroshot": None}
    assert raw["shots"] == [1] and "pretrained" not in raw["backbone"]["init_args"]  # a copy
    with pytest.raises(ValueError, match="shots is a list, not a mapping"):
        with_overrides(raw, ["--shots.first=1"])


def test_a_config_is_typed_and_overridden(tmp_path):
    cfg = load_eval_config(DEMO, ["--trainer.max_epochs=3", "--seeds=[7]", "--transfer.targets={}", "--transfer.shots=2"])
    assert isinstance(cfg, EvaluationConfig) and cfg.seeds == [7] and cfg.trainer["max_epochs"] == 3
    assert cfg.transfer.shots == 2 and cfg.transfer.name == "cross-dataset"  # a typed TransferProtocol, defaults filled
    with pytest.raises(ValueError, match="--colour: not an option, nor a key of the config"):
        load_eval_config(DEMO, ["--colour=red"])
    with pytest.raises(Exception, match="seeds"):
        load_eval_config(DEMO, ["--seeds=three"])
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**yaml.safe_load(DEMO.read_text()), "shots": "many"}))
    with pytest.raises(Exception, match="shots"):
        load_eval_config(bad)


@pytest.mark.parametrize("config", ["shapeworld_demo", "shapeworld_tta", "shapeworld_multitask", "seg/shapeworld_demo",
                                    "shapeworld_gram"])
def test_print_config_shows_the_config_as_it_would_run(config, capsys):
    main(["demo", "--config", config, "--print_config", "--trainer.max_epochs", "3", "--max-epochs", "2"])
    printed = capsys.readouterr().out
    documents = [d for d in yaml.safe_load_all(printed) if d]
    assert documents and all(d["trainer"]["max_epochs"] == 3 for d in documents)  # the override, typed
    if "methods" in documents[0] and config != "shapeworld_tta":  # --max-epochs sets each method's
        assert all(m["trainer"]["max_epochs"] == 2 for d in documents for m in d["methods"].values())
