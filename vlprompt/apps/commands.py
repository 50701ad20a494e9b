"""The light part of the application commands: the argument parsers of ``eval-fewshot``,
``eval-multitask``, ``transferability`` and ``demo``, and the reading of their YAML files.

Standard library and PyYAML only, on purpose: ``vlprompt <command> --help`` and a mistyped option
are answered from here in a fraction of a second, before the command imports PyTorch and Lightning.
"""

from __future__ import annotations


from vlprompt.apps.runner import CommandParser

__all__ = ["demo_parser", "fewshot_parser", "multitask_parser", "transferability_parser"]


def fewshot_parser() -> CommandParser:
    """``vlprompt eval-fewshot`` / ``tools/eval_fewshot.py``."""
    parser = CommandParser(
        overrides=True,
        prog="vlprompt eval-fewshot",
        description="Few-shot transfer evaluation: zero-shot vs tuned prompts over shots x seeds, base-to-novel "
                    "generalisation, and transfer to other datasets (cross-dataset, domain generalisation).")
    parser.add_argument("--config", required=True, help="evaluation YAML (see configs/eval/)")
    parser.add_argument("--output-dir", default="outputs/eval_fewshot")
    parser.add_argument("--overwrite", action="store_true", help="replace existing results in --output-dir")
    parser.add_argument("--root", help="override the data root of the source and every target")
    parser.add_argument("--model-name", help="override backbone.init_args.model_name")
    parser.add_argument("--pretrained", help="override backbone.init_args.pretrained")
    parser.add_argument("--shots", type=int, nargs="*", help="override shots (none: skip the all-classes runs)")
    parser.add_argument("--seeds", type=int, nargs="+", help="override seeds")
    parser.add_argument("--methods", nargs="+", help="only these methods from the config")
    parser.add_argument("--max-epochs", type=int, help="override every method's max_epochs")
    parser.add_argument("--no-base-to-novel", action="store_true")
    parser.add_argument("--no-transfer", action="store_true", help="skip the cross-dataset / domain-generalisation runs")
    parser.add_argument("--save-prompts", action="store_true", help="save every learned prompt under output-dir/prompts")
    return parser


def multitask_parser() -> CommandParser:
    """``vlprompt eval-multitask`` / ``tools/eval_multitask.py``."""
    parser = CommandParser(
        overrides=True,
        prog="vlprompt eval-multitask",
        description="Multitask prompt tuning and transfer (MVLPT): a source prompt learned on several tasks at "
                    "once, then used on held-out target tasks.")
    parser.add_argument("--config", required=True, help="multitask evaluation YAML (see configs/eval/shapeworld_multitask.yaml)")
    parser.add_argument("--output-dir", default="outputs/eval_multitask")
    parser.add_argument("--overwrite", action="store_true", help="replace existing results in --output-dir")
    parser.add_argument("--methods", nargs="+", help="only these methods from the config")
    parser.add_argument("--root", help="the data root of every source and target task")
    return parser


def transferability_parser() -> CommandParser:
    """``vlprompt transferability`` / ``tools/transferability.py``."""
    parser = CommandParser(
        overrides=True,
        prog="vlprompt transferability",
        description="Task transferability: which tasks help each other when a prompt learned on one is used on "
                    "another (the study behind MVLPT's task groups; Shen et al., WACV 2024, Sec. 5).")
    parser.add_argument("--config", required=True, help="study YAML (see configs/eval/shapeworld_transferability.yaml)")
    parser.add_argument("--output-dir", default="outputs/transferability")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier study in --output-dir")
    parser.add_argument("--finetune", action="store_true", help="tune each target from the source prompt")
    return parser


def demo_parser() -> CommandParser:
    """``vlprompt demo``."""
    parser = CommandParser(
        overrides=True,
        prog="vlprompt demo",
        description="The offline demo on the embedded default: ShapeWorld classes held out from the embedded "
                    "CLIP's pretraining, zero-shot CLIP against few-shot prompt learning; other shipped configs run "
                    "the base-to-novel, transfer, TTA, multitask, segmentation and GRAM demos. Results, tables and "
                    "a plot land in outputs/demo/<timestamp>/.")
    parser.add_argument(
        "--config",
        default="shapeworld_demo",
        help="an evaluation YAML, or the name of one shipped in configs/eval/ (shapeworld_demo: "
        "zero-shot vs CoOp over shots; shapeworld_base_to_novel: every method, base-to-novel; "
        "shapeworld_transfer: source domain to held-out classes and other domains; "
        "shapeworld_tta: zero-shot vs TPT vs DiffTPT on a shifted split; shapeworld_multitask: "
        "MVLPT, a prompt from three source tasks used on held-out target tasks; seg/shapeworld_demo: "
        "referring segmentation, zero-shot vs text, visual and multimodal prompts; shapeworld_gram: CoOp and "
        "VPT from their usual initialisation vs GRAM's meta-prompt, with and without its gradient regulator)",
    )
    parser.add_argument("--output-dir", help="default: outputs/demo/<timestamp>")
    parser.add_argument("--data-root", help="where the ShapeWorld images are generated (default from the config)")
    parser.add_argument("--shots", type=int, nargs="+")
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--max-epochs", type=int)
    parser.add_argument("--methods", nargs="+", help="only these methods from the config")
    return parser


