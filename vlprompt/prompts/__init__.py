"""Prompt learners: one file per method, all registered in :data:`PROMPT_LEARNERS`."""

from vlprompt.prompts.base import (
    PROMPT_LEARNERS,
    PromptLearner,
    PromptLearnerFactory,
    PromptOutput,
    get_prompt_learner,
    register_prompt_learner,
)
from vlprompt.prompts.cocoop import CoCoOpPromptLearner
from vlprompt.prompts.coop import CoOpPromptLearner, load_dassl_state_dict
from vlprompt.prompts.decoupled import DecoupledDePTPromptLearner
from vlprompt.prompts.deep_cocoop import DeepCoCoOpPromptLearner
from vlprompt.prompts.dept import DePTPromptLearner
from vlprompt.prompts.io import average_prompts, load_prompt, read_prompt_config, read_prompt_tensors, save_prompt
from vlprompt.prompts.ivlp import IVLPPromptLearner
from vlprompt.prompts.kgcoop import KgCoOpPromptLearner
from vlprompt.prompts.maple import MaPLePromptLearner
from vlprompt.prompts.promptsrc import PromptSRCPromptLearner
from vlprompt.prompts.shared_attention import SharedAttentionPromptLearner
from vlprompt.prompts.shared_separate import SharedSeparatePromptLearner
from vlprompt.prompts.templates import resolve_templates
from vlprompt.prompts.upt import UPTPromptLearner
from vlprompt.prompts.vpt import VPTPromptLearner
from vlprompt.prompts.zeroshot import ZeroShotPrompt

__all__ = [
    "PROMPT_LEARNERS",
    "CoCoOpPromptLearner",
    "CoOpPromptLearner",
    "DecoupledDePTPromptLearner",
    "DeepCoCoOpPromptLearner",
    "DePTPromptLearner",
    "IVLPPromptLearner",
    "KgCoOpPromptLearner",
    "MaPLePromptLearner",
    "PromptLearner",
    "PromptLearnerFactory",
    "PromptOutput",
    "PromptSRCPromptLearner",
    "SharedAttentionPromptLearner",
    "SharedSeparatePromptLearner",
    "UPTPromptLearner",
    "VPTPromptLearner",
    "ZeroShotPrompt",
    "average_prompts",
    "get_prompt_learner",
    "load_dassl_state_dict",
    "load_prompt",
    "read_prompt_config",
    "read_prompt_tensors",
    "register_prompt_learner",
    "resolve_templates",
    "save_prompt",
]
