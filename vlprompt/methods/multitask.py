"""``MultiTaskPromptClassifier``: one prompt tuned on several classification tasks at once
(MVLPT: Shen et al., "Multitask Vision-Language Prompt Tuning", WACV 2024).

It is :class:`~vlprompt.methods.PromptClassifier` (which already scores each image over its own
task's classes and offers ``loss="task"``) reporting each task's score: its own metric (top-1 or
mean per-class accuracy) and their unweighted mean (:class:`~vlprompt.methods.reports.TaskReport`).
Tasks are met through :class:`~vlprompt.data.multitask.MultiTaskDataModule`; a single-task data
module is one task. The name stays for configs and checkpoints that use it.
"""

from __future__ import annotations

from vlprompt.methods.classifier import MultiTaskLoss, PromptClassifier
from vlprompt.methods.reports import ClassificationReport, TaskReport
from vlprompt.methods.tasks import task_scores

__all__ = ["MultiTaskLoss", "MultiTaskPromptClassifier", "task_scores"]


class MultiTaskPromptClassifier(PromptClassifier):
    """:class:`~vlprompt.methods.PromptClassifier` scored per task (MVLPT; see the module docstring).

    Follows the data's classes and tasks from set-up on. After ``trainer.test``,
    :attr:`task_results` holds each task's score; the logged metrics are ``test/<task>`` per task
    and ``test/acc``, their mean (``val/acc`` likewise). Arguments as for
    :class:`~vlprompt.methods.PromptClassifier` (``loss``: ``union`` as MVLPT, or ``task``).
    """

    report: type[ClassificationReport] = TaskReport
    _recorded_when_set = ("feature_bank", "feature_bank_dtype", "drop_last")
