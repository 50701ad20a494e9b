"""The papers' training protocol (issue 21): Dassl's per-epoch warm-up + cosine schedule, its
training loader that drops the last incomplete batch, and prompts that end in one full stop
(TuneVLSeg's ``insert_stop_at_last``)."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml

from vlprompt.data import FewShotDataModule
from vlprompt.data.classnames import fill_template, with_full_stop
from vlprompt.methods import PromptClassifier
from vlprompt.methods.optimization import dassl_epoch_factor, prompt_optimization
from vlprompt.prompts import CoOpPromptLearner, ZeroShotPrompt

ROOT = Path(__file__).resolve().parents[1]
COOP = functools.partial(CoOpPromptLearner, n_ctx=2)


def dassl_reference_rates(base_lrs: list[float], max_epoch: int, warmup_epoch: int, cons_lr: float) -> list[list[float]]:
    """The rates each epoch runs at in Dassl (``build_lr_scheduler`` with ``cosine`` and a constant
    warm-up; ``WARMUP_RECOUNT`` True, the default), restated: a ``CosineAnnealingLR(T_max=
    max_epoch)`` built first, then a wrapper that holds ``cons_lr`` while its own epoch count is
    below ``warmup_epoch`` and afterwards hands each step to the cosine. The trainer steps it once,
    after each epoch's last batch."""
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in base_lrs]
    optimizer = torch.optim.SGD([{"params": [p], "lr": lr} for p, lr in zip(params, base_lrs)], lr=base_lrs[0])
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, float(max_epoch))
    wrapper_epoch = 0
    if warmup_epoch > 0:  # Dassl wraps the cosine only then; building the wrapper steps it to count 0
        for group in optimizer.param_groups:
            group["lr"] = cons_lr
    rates = []
    for _ in range(max_epoch):
        rates.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()  # no gradients: nothing moves; keeps PyTorch's step order
        if wrapper_epoch >= warmup_epoch:
            cosine.step()
        else:
            wrapper_epoch += 1
            if wrapper_epoch >= warmup_epoch:  # the wrapper now reports the cosine's last rates
                for group, lr in zip(optimizer.param_groups, cosine.get_last_lr()):
                    group["lr"] = lr
    return rates


class FakeTrainer:
    def __init__(self, max_epochs: int | None) -> None:
        self.max_epochs = max_epochs


@pytest.mark.parametrize("max_epochs,warmup", [(10, 1), (5, 1), (7, 0), (6, 2)])
def test_dassl_schedule_steps_per_epoch_as_dassl(max_epochs, warmup):
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))]
    sgd = functools.partial(torch.optim.SGD, lr=0.002, momentum=0.9)
    groups = [{"params": [params[0]]}, {"params": [params[1]], "lr_scale": 6.5}]  # e.g. Decoupled DePT's head
    configured = prompt_optimization(sgd, groups, lambda: FakeTrainer(max_epochs), lr_scheduler="dassl",
                                     warmup_epochs=warmup, warmup_lr=1e-5)
    scheduler = configured["lr_scheduler"]
    assert scheduler["interval"] == "epoch"
    ours = []
    for _ in range(max_epochs):
        ours.append([g["lr"] for g in configured["optimizer"].param_groups])
        configured["optimizer"].step()
        scheduler["scheduler"].step()
    reference = dassl_reference_rates([0.002, 0.002 * 6.5], max_epochs, warmup, 1e-5)
    assert torch.tensor(ours, dtype=torch.float64).allclose(torch.tensor(reference, dtype=torch.float64),
                                                            rtol=1e-12, atol=0)


def test_dassl_schedule_formula_keeps_a_tenth_of_the_rate_in_the_last_epoch():
    factor = dassl_epoch_factor(10, 1, 0.005)
    assert factor(0) == 0.005
    assert factor(1) == 1.0  # the cosine restarts its count after the warm-up
    for e in range(1, 10):
        assert factor(e) == pytest.approx(0.5 * (1 + math.cos(math.pi * (e - 1) / 10)), abs=1e-15)
    assert factor(9) == pytest.approx(0.0955, abs=1e-4)  # never 0, unlike the per-step cosine


def test_dassl_schedule_needs_a_number_of_epochs():
    params = [torch.nn.Parameter(torch.zeros(1))]
    with pytest.raises(ValueError, match="max_epochs"):
        prompt_optimization(functools.partial(torch.optim.SGD, lr=0.1), params, lambda: FakeTrainer(-1),
                            lr_scheduler="dassl")
    with pytest.raises(ValueError, match="lr_scheduler"):
        prompt_optimization(functools.partial(torch.optim.SGD, lr=0.1), params, lambda: FakeTrainer(3),
                            lr_scheduler="cosine_per_epoch")


class RecordRates(pl.Callback):
    def __init__(self) -> None:
        self.rates: list[tuple[int, float]] = []
        self.batches: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.rates.append((trainer.current_epoch, trainer.optimizers[0].param_groups[0]["lr"]))
        self.batches.append(len(batch["label"]))


def fit(backbone, root, *, epochs: int = 1, batch_size: int = 5, **model_args) -> RecordRates:
    dm = FewShotDataModule(str(root), shots=16, batch_size=batch_size, num_workers=0, augment=False)
    model = PromptClassifier(backbone, COOP, dm.classnames, **model_args)
    record = RecordRates()
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         callbacks=[record])
    trainer.fit(model, datamodule=dm)
    return record


def test_a_fit_runs_each_epoch_at_dassls_rate(backbone, dassl_folder):
    record = fit(backbone, dassl_folder, epochs=3, lr_scheduler="dassl", warmup_epochs=1, warmup_lr=1e-5)
    expected = [1e-5, 0.002, 0.002 * 0.5 * (1 + math.cos(math.pi / 3))]
    for epoch, lr in record.rates:
        assert lr == pytest.approx(expected[epoch], rel=1e-12)
    assert {epoch for epoch, _ in record.rates} == {0, 1, 2}


def test_drop_last_drops_the_incomplete_batch_as_dassls_loader(backbone, dassl_folder):
    # 4 classes x 8 training images = 32 images in batches of 5: six full ones and 2 left over.
    assert fit(backbone, dassl_folder, drop_last=True).batches == [5] * 6
    # The wish is renewed at every fit: the next method without it sees the whole set again.
    assert sorted(fit(backbone, dassl_folder).batches) == [2] + [5] * 6
    # A training set smaller than one batch is kept whole (Dassl: only when len >= batch size).
    assert fit(backbone, dassl_folder, drop_last=True, batch_size=40).batches == [32]


def test_paper_recipes_use_dassls_schedule_and_loader():
    for path in sorted((ROOT / "configs/methods").glob("*.yaml")):
        model = yaml.safe_load(path.read_text())["model"]
        if "optimizer" not in model:  # zero-shot: nothing is trained
            continue
        assert model.get("lr_scheduler") == "dassl", path.name
        assert model.get("drop_last") is True, path.name


# -- the full stop --------------------------------------------------------------------------------
def test_full_stop_is_added_only_where_missing():
    assert with_full_stop("a red circle") == "a red circle."
    assert with_full_stop("the red circle.") == "the red circle."
    assert with_full_stop("a photo of a dog.") == "a photo of a dog."
    assert fill_template("a photo of a {}.", "the red circle.") == "a photo of a the red circle."
    assert fill_template("a photo of a {}, a type of pet.", "pug") == "a photo of a pug, a type of pet."
    assert fill_template("{}", "pug") == "pug." and fill_template("{}", "pug.") == "pug."


class RecordingBackbone:
    """Delegates to a backbone, recording the texts it is asked to encode."""

    def __init__(self, backbone) -> None:
        self._backbone, self.texts = backbone, []

    def encode_text(self, texts, *args, **kwargs):
        self.texts.extend(texts)
        return self._backbone.encode_text(texts, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._backbone, name)


@pytest.mark.parametrize("learner", ["coop", "zeroshot_braces", "zeroshot_photo"])
def test_a_prompt_ending_in_a_stop_gets_no_second_one(backbone, learner):
    names = ["red circle", "blue square."]
    if learner == "coop":
        prompt = COOP(backbone, names)
        texts = [prompt._prompt_text(name)[0] for name in prompt.classnames]
        assert texts[0].endswith(" red circle.") and texts[1].endswith(" blue square.")
        with torch.no_grad():  # "x." and "x" are one prompt
            same = COOP(backbone, ["red circle.", "blue square"])
            same.load_state_dict(prompt.state_dict())
            assert torch.equal(same.text_features(), prompt.text_features())
        return
    template = "{}" if learner == "zeroshot_braces" else "a photo of a {}."
    recording = RecordingBackbone(backbone)
    ZeroShotPrompt(recording, names, templates=template).text_features()
    expected = {"{}": ["red circle.", "blue square."],
                "a photo of a {}.": ["a photo of a red circle.", "a photo of a blue square."]}[template]
    assert recording.texts == expected
