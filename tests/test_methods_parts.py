"""The parts methods are built from: data protocols (never hasattr), one classifier for one task or
several, task masking, hyper-parameters as before, and modules that inherit no classification state."""

from __future__ import annotations

import functools

import pytest
import torch

from vlprompt.data import (
    FewShotDataModule,
    ImageTextPairsDataModule,
    MultiTaskDataModule,
)
from vlprompt.data.protocol import (
    ClassificationData,
    EpisodeData,
    LabelsOnlyDataset,
    LoaderWorkers,
    MultiTaskData,
    PreprocessedData,
    SeededDataset,
    SegmentationData,
)
from vlprompt.methods import (
    MultiTaskPromptClassifier,
    PromptClassifier,
    PromptModule,
    PromptSegmenter,
    TaskScorer,
    TestTimePromptTuning,
)
from vlprompt.methods.optimization import prompt_optimization, warmup_cosine
from vlprompt.prompts import CoOpPromptLearner

COOP = functools.partial(CoOpPromptLearner, n_ctx=2)


def fewshot(root, **kw):
    return FewShotDataModule(str(root), **{"shots": 2, "num_workers": 0, "batch_size": 4, "augment": False, **kw})


def test_data_modules_declare_what_they_offer(dassl_folder, image_folder, backbone, tmp_path):
    dm = fewshot(dassl_folder)
    dm.set_preprocess(backbone.preprocess_cfg)
    dm.setup("fit")
    assert isinstance(dm, ClassificationData) and isinstance(dm, PreprocessedData) and isinstance(dm, LoaderWorkers)
    assert not isinstance(dm, MultiTaskData) and not isinstance(dm, EpisodeData)
    train = dm.dataset("train")
    assert isinstance(train, SeededDataset) and isinstance(train, LabelsOnlyDataset)
    tasks = MultiTaskDataModule({"a": fewshot(dassl_folder), "b": fewshot(image_folder)}, num_workers=0)
    assert isinstance(tasks, MultiTaskData)
    from vlprompt.data import ShapeWorldSegmentationDataModule

    seg = ShapeWorldSegmentationDataModule(str(tmp_path / "seg"), domain="clean", num_workers=0)
    assert isinstance(seg, SegmentationData) and not isinstance(seg, ClassificationData)
    from vlprompt.data.world import write_caption_dataset

    pairs = ImageTextPairsDataModule(str(write_caption_dataset(tmp_path / "pairs", 8, image_size=32)), num_workers=0)
    assert isinstance(pairs, EpisodeData) and not isinstance(pairs, ClassificationData)


def test_single_task_is_one_task_and_multitask_is_the_same_class(backbone):
    names = ["red square", "green square", "blue square"]
    single = PromptClassifier(backbone, COOP, names)
    multi = MultiTaskPromptClassifier(backbone, COOP, names)
    assert isinstance(multi, PromptClassifier) and type(multi).__mro__[1] is PromptClassifier
    own = {k for k, v in vars(MultiTaskPromptClassifier).items() if callable(v) or isinstance(v, property)}
    assert own == {"report"}  # no method of its own: only what it reports
    assert [t.name for t in single.tasks] == ["task"] and single.task_scorer.task_mask.all()
    logits = torch.randn(5, 3)
    # One task masks nothing: masked_fill copies every value, no arithmetic, so equality is exact.
    assert torch.equal(single.own_task_logits(logits, torch.zeros(5, dtype=torch.long)), logits)
    # Hyper-parameters read as they did when these were two classes.
    assert "loss" not in single.hparams and "feature_bank" in single.hparams
    assert "loss" in multi.hparams and "feature_bank" not in multi.hparams
    assert PromptClassifier(backbone, COOP, names, loss="task").hparams["loss"] == "task"
    with pytest.raises(ValueError, match="loss must be union or task"):
        PromptClassifier(backbone, COOP, names, loss="other")


def test_task_scorer_keeps_each_image_to_its_own_task(backbone):
    from vlprompt.data import Task

    scorer = TaskScorer(["a", "b", "c"])
    scorer.set_tasks([Task("x", 0, ("a",)), Task("y", 1, ("b", "c"))], ["a", "b", "c"])
    masked = scorer.own_task_logits(torch.zeros(2, 3), torch.tensor([0, 1]))
    assert masked[0].isinf().tolist() == [False, True, True] and masked[1].isinf().tolist() == [True, False, False]
    assert "task_mask" not in scorer.state_dict()
    with pytest.raises(ValueError, match="offsets must follow"):
        scorer.set_tasks([Task("x", 1, ("a",))], ["a"])


def test_segmentation_and_test_time_tuning_inherit_no_classification_state(backbone):
    segmenter = PromptSegmenter(backbone, COOP, reduce_dim=8, n_heads=2)
    tpt = TestTimePromptTuning(backbone, classnames=["a", "b"], n_views=2)
    for module in (segmenter, tpt):
        assert isinstance(module, PromptModule) and not isinstance(module, PromptClassifier)
        assert not hasattr(module, "image_features") and not hasattr(module, "task_scorer")
    assert "label_smoothing" not in tpt.hparams and "feature_bank" not in tpt.hparams
    assert tpt.hparams["classnames"] == ["a", "b"]
    with pytest.raises(ValueError, match="needs class names"):
        TestTimePromptTuning(backbone)


def test_prompt_optimization_is_coops_schedule():
    class Trainer:
        estimated_stepping_batches, max_epochs = 20, 4

    params = [torch.nn.Parameter(torch.zeros(2))]
    sgd = functools.partial(torch.optim.SGD, lr=0.1)
    configured = prompt_optimization(sgd, [{"params": params, "lr_scale": 2.0}], Trainer, warmup_epochs=1,
                                     warmup_lr=1e-3)
    optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    assert optimizer.param_groups[0]["initial_lr"] == pytest.approx(0.2) and "lr_scale" not in optimizer.param_groups[0]
    expected = warmup_cosine(20, 5, 1e-3 / 0.2)
    assert [scheduler.lr_lambdas[0](s) for s in range(20)] == [expected(s) for s in range(20)]
    assert prompt_optimization(sgd, params, lambda: pytest.fail("a constant rate needs no trainer"), lr_scheduler="constant").__class__ is torch.optim.SGD
