"""GRAM: image-text pair sources, cross-modal clustering and episodes, the gradient regulator, the
functional inner loop (hand-computed SGD, finite-difference meta-gradients), downstream use."""

from __future__ import annotations

import functools
import io
import json
import tarfile

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from conftest import TINY_CLIP, make_backbone
from vlprompt.backbones import BackboneMismatchError
from vlprompt.data import ImageTextPairs, ImageTextPairsDataModule
from vlprompt.data.pairs import expand_shards, load_pair_image
from vlprompt.data.world import write_caption_dataset
from vlprompt.meta import EpisodeSampler, GradientRegulator, cluster_pairs
from vlprompt.methods import GRAMMetaLearner, GradientRegulation, PromptClassifier
from vlprompt.prompts import CoOpPromptLearner, IVLPPromptLearner, VPTPromptLearner

pytest.importorskip("sklearn")

COOP = functools.partial(CoOpPromptLearner, n_ctx=2)


@pytest.fixture(scope="module")
def pair_folder(tmp_path_factory):
    return write_caption_dataset(tmp_path_factory.mktemp("pairs"), 96, image_size=32)


# -- pair sources ----------------------------------------------------------------------------------
def _write_shards(folder, pairs, per_shard=40):
    folder.mkdir()
    for s in range(0, len(pairs), per_shard):
        with tarfile.open(folder / f"cc-{s // per_shard:03d}.tar", "w") as tar:
            for pair in pairs[s:s + per_shard]:
                for name, data in ((f"{pair.key}.png", open(pair.ref, "rb").read()),
                                   (f"{pair.key}.txt", pair.caption.encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def test_folder_table_and_shards_give_the_same_pairs(pair_folder, tmp_path):
    pairs = list(ImageTextPairs(pair_folder))
    assert len(pairs) == 96 and all(p.caption for p in pairs)
    table = tmp_path / "pairs.tsv"
    table.write_text("filepath\ttitle\n" + "".join(f"{p.ref}\t{p.caption}\n" for p in pairs))
    _write_shards(tmp_path / "shards", pairs)
    assert expand_shards(str(tmp_path / "shards" / "cc-{000..002}.tar"))[-1].endswith("cc-002.tar")
    for source in (table, str(tmp_path / "shards" / "cc-{000..002}.tar"), tmp_path / "shards"):
        other = list(ImageTextPairs(source))
        assert [p.caption for p in other] == [p.caption for p in pairs], source
        assert np.array_equal(np.asarray(load_pair_image(other[5].ref)), np.asarray(load_pair_image(pairs[5].ref)))


def test_bad_pair_sources_get_clear_errors(pair_folder, tmp_path):
    table = tmp_path / "captions.csv"
    table.write_text("image,caption\n" + f"{pair_folder / '0000000.png'},a star\nnowhere.png,a circle\n")
    with pytest.raises(FileNotFoundError, match="1 of 2 images do not exist"):
        list(ImageTextPairs(table))
    (tmp_path / "bad.csv").write_text("file_name,label\na.png,x\n")
    with pytest.raises(ValueError, match="must name an image column"):
        list(ImageTextPairs(tmp_path / "bad.csv"))
    with pytest.raises(FileNotFoundError, match="shards do not exist"):
        ImageTextPairs(str(tmp_path / "cc-{000..001}.tar"))


def test_unreadable_images_are_skipped_and_counted(pair_folder, tmp_path):
    import shutil

    folder = tmp_path / "some"
    folder.mkdir()
    for name in ("0000000", "0000001", "0000002"):
        shutil.copy(pair_folder / f"{name}.png", folder)
        shutil.copy(pair_folder / f"{name}.txt", folder)
    (folder / "0000001.png").write_bytes(b"not a png")
    (folder / "orphan.png").write_bytes((pair_folder / "0000003.png").read_bytes())  # no caption
    dm = ImageTextPairsDataModule(str(folder), num_workers=0)
    dm.set_preprocess({"size": 32, "mean": (0.5,) * 3, "std": (0.5,) * 3})
    batches = list(dm.embedding_loader())
    assert sum(len(c) for _, c in batches) == 2 and dm.unreadable == 1 and dm.pairs.skipped == 1


# -- clustering and episodes --------------------------------------------------------------------------
def _synthetic(n_domains=3, classes=4, per_class=10, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_domains, 1, dim, generator=g) * 4 + torch.randn(n_domains, classes, dim, generator=g)
    image = (centres[:, :, None] + 0.05 * torch.randn(n_domains, classes, per_class, dim, generator=g)).reshape(-1, dim)
    captions = [f"caption {i}" for i in range(len(image))]
    return image, image + 0.01 * torch.randn(image.shape, generator=g), captions


def test_clustering_recovers_domains_and_classes_and_episodes_never_share_images():
    image, text, captions = _synthetic()
    h = cluster_pairs(image, text, captions, n_domains=3, classes_per_domain=4, min_class_size=5)
    truth = np.arange(len(image)) // 10
    assert len(h.classnames) == 12 and len(set(h.classnames)) == 12
    for c in range(12):  # every pseudo-class is one true class
        assert len(set(truth[h.label == c])) == 1
    sampler = EpisodeSampler(h, n_way=3, k_shot=2, q_query=4, seed=1)
    for i in range(30):
        ep = sampler[i]
        assert not set(ep.support) & set(ep.query)
        assert len(set(h.domain[ep.support])) == 1 and len(set(h.domain[ep.query])) == 1
        assert h.domain[ep.support[0]] != h.domain[ep.query[0]]
        assert [h.classnames[h.label[j]] for j in ep.support[::2]] == ep.support_names
        assert len(ep.query) == 12 and list(ep.query_labels) == [0] * 4 + [1] * 4 + [2] * 4
    assert np.array_equal(sampler[7].support, sampler[7].support)


def test_fewer_clusters_than_ways_is_refused():
    image, text, captions = _synthetic()
    h = cluster_pairs(image, text, captions, n_domains=3, classes_per_domain=4, min_class_size=5)
    with pytest.raises(ValueError, match="fewer clusters than ways"):
        EpisodeSampler(h, n_way=5, k_shot=2, q_query=4)
    with pytest.raises(ValueError, match="cannot form"):
        cluster_pairs(image[:10], text[:10], captions[:10], n_domains=3, classes_per_domain=4)


# -- the regulator ----------------------------------------------------------------------------------
def test_regulator_starts_as_identity_and_always_preserves_norms():
    torch.manual_seed(0)
    reg = GradientRegulator(hidden=8)
    for shape in [(4, 48), (3, 2, 32), (96,)]:
        g, p = torch.randn(shape), torch.randn(shape)
        assert torch.allclose(reg(g, p), g, atol=1e-6)
    with torch.no_grad():
        reg.mlp[2].weight.normal_()
        reg.gate.fill_(2.0)
    for shape in [(4, 48), (3, 2, 32), (96,)]:
        g, p = torch.randn(shape) * 3, torch.randn(shape)
        out = reg(g, p)
        assert out.shape == g.shape and not torch.allclose(out, g, atol=1e-3)
        assert torch.allclose(out.norm(), g.norm(), rtol=1e-5)
        assert torch.allclose(reg(7 * g, p), 7 * out, rtol=1e-4, atol=1e-5)  # scale-equivariant
    assert torch.equal(reg(torch.zeros(4, 8), torch.randn(4, 8)), torch.zeros(4, 8))


# -- the inner loop and the meta-gradients -------------------------------------------------------------
def _episode(backbone, n_way=3, k=2, q=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"support": torch.arange(n_way * k), "support_labels": torch.arange(n_way).repeat_interleave(k),
            "support_names": ["red star", "blue circle", "green square"][:n_way],
            "query": torch.arange(n_way * k, n_way * (k + q)), "query_labels": torch.arange(n_way).repeat_interleave(q),
            "query_names": ["pink heart", "cyan cross", "orange arrow"][:n_way],
            "features": torch.randn(n_way * (k + q), backbone.embed_dim, generator=g, dtype=torch.float64)}


def _learner(backbone, regulate=True, second_order=False, steps=2, factory=COOP):
    torch.manual_seed(0)
    model = GRAMMetaLearner(backbone, factory, n_way=3, inner_steps=steps, inner_lr=0.5, regulate=regulate,
                            second_order=second_order, regulator_hidden=4)
    return model


def test_inner_loop_equals_hand_computed_sgd_when_the_regulator_is_the_identity(backbone):
    ep = _episode(backbone)
    for regulate in (False, True):  # a fresh regulator is the identity
        model = _learner(backbone, regulate=regulate)
        model.image_features = ep["features"].float()
        adapted = model.adapt(model.prompt_params(), ep)
        ctx = model.prompt_learner.ctx.detach().clone()
        for _ in range(2):
            ctx.requires_grad_(True)
            loss = model.episode_loss({"ctx": ctx}, ep, "support")
            (grad,) = torch.autograd.grad(loss, ctx)
            ctx = (ctx - 0.5 * grad).detach()
        assert torch.allclose(adapted["ctx"], ctx, atol=1e-6)


@pytest.mark.parametrize("second_order", [False, True])
def test_meta_gradients_agree_with_finite_differences(tmp_path, second_order):
    backbone = make_backbone(tmp_path / "m", TINY_CLIP).double()
    ep = _episode(backbone)
    model = _learner(backbone, second_order=second_order, steps=1).double()
    model.image_features = ep["features"]
    with torch.no_grad():  # a regulator that is not the identity
        model.regulator.mlp[2].weight.normal_(0, 0.5)
        model.regulator.gate.fill_(0.5)
    theta = model.prompt_learner.ctx
    params = [theta, *model.regulator.parameters()]
    grads = torch.autograd.grad(model.meta_loss([ep]), params)
    lr = model.hparams.inner_lr
    frozen = torch.autograd.grad(model.episode_loss({"ctx": theta}, ep, "support"), theta)[0].detach()

    def objective() -> float:
        if second_order:  # the true meta-objective
            return model.meta_loss([ep]).item()
        # first order: the support gradient held at its value at the unperturbed prompt
        return model.episode_loss({"ctx": theta - lr * model.regulator(frozen, theta)}, ep, "query").item()

    g = torch.Generator().manual_seed(3)
    for param, grad in zip(params, grads):
        direction = torch.randn(param.shape, generator=g, dtype=param.dtype)
        eps = 1e-5
        with torch.no_grad():
            param.add_(eps * direction)
            up = objective()
            param.sub_(2 * eps * direction)
            down = objective()
            param.add_(eps * direction)
        numeric, analytic = (up - down) / (2 * eps), float((grad * direction).sum())
        assert abs(numeric - analytic) <= 1e-6 + 1e-5 * abs(numeric), (param.shape, numeric, analytic)


def test_only_prompt_and_regulator_parameters_get_gradients(backbone):
    ep = _episode(backbone)
    for factory in (COOP, functools.partial(VPTPromptLearner, n_tokens=2, depth=2),
                    functools.partial(IVLPPromptLearner, n_ctx=2, ctx_init=None, text_depth=2, n_vision_tokens=2,
                                      vision_depth=2)):  # UNIGRAM: text and visual prompts together
        model = _learner(backbone, factory=factory, steps=1)
        model.image_features = ep["features"].float()
        with torch.no_grad():  # as after some meta-training (a fresh one is the identity: no gradient reaches
            model.regulator.mlp[2].weight.normal_()  # its first layer or its gate yet)
        episode = dict(ep)
        if model.prompt_learner.uses_image_tower:
            episode["support_image"] = torch.randn(6, 3, 32, 32)
            episode["query_image"] = torch.randn(9, 3, 32, 32)
        model.meta_loss([episode]).backward()
        learned = [*model.prompt_learner.parameters(), *model.regulator.parameters()]
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in learned), factory
        assert all(p.grad is None for p in backbone.parameters())
        backbone.zero_grad(set_to_none=True)


# -- end to end: meta-train, save, use downstream ----------------------------------------------------------
def test_meta_train_save_and_start_any_learner_from_it(backbone, pair_folder, image_folder, tmp_path):
    pl.seed_everything(0)
    model = GRAMMetaLearner(backbone, COOP, n_way=3, k_shot=2, q_query=3, n_domains=2, classes_per_domain=4,
                            min_class_size=3, inner_steps=2, inner_lr=0.5)
    dm = ImageTextPairsDataModule(str(pair_folder), episodes_per_epoch=4, episodes_per_batch=2, num_workers=0)
    before = model.prompt_learner.ctx.detach().clone()
    pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False).fit(model, datamodule=dm)
    assert not torch.allclose(model.prompt_learner.ctx, before)
    assert dm._episodes.epoch == 1  # the second epoch drew episodes 4..7, not 0..3 again
    saved = model.save_meta_prompt(tmp_path / "meta")
    assert (saved / "regulator.safetensors").is_file()

    # Downstream: CoOp on the colour folder starts from the meta-prompt, the regulator shapes its steps.
    from vlprompt.data import FewShotDataModule

    fewshot = FewShotDataModule(str(image_folder), shots=2, batch_size=8, num_workers=0)
    classifier = PromptClassifier(backbone, COOP, ["red square", "green square", "blue square", "yellow square"],
                                  init_prompt=str(saved), lr_scheduler="constant")
    assert torch.equal(classifier.prompt_learner.ctx, model.prompt_learner.ctx)
    seen = []

    class Spy(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            seen.append(pl_module.prompt_learner.ctx.grad.clone())

    regulation = GradientRegulation(str(saved))
    with torch.no_grad():
        regulation.regulator.mlp[2].weight.normal_()  # make it visibly not the identity
    pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, callbacks=[Spy(), regulation, Spy()], limit_val_batches=0).fit(
        classifier, datamodule=fewshot)
    raw, regulated = seen[0], seen[1]
    assert torch.allclose(raw.norm(), regulated.norm(), rtol=1e-5) and not torch.allclose(raw, regulated)


def test_a_meta_prompt_from_another_backbone_is_refused(backbone, tmp_path):
    other = make_backbone(tmp_path / "other", TINY_CLIP, seed=5)
    model = _learner(other)
    saved = model.save_meta_prompt(tmp_path / "meta")
    with pytest.raises(BackboneMismatchError):
        PromptClassifier(backbone, COOP, ["a", "b"], init_prompt=str(saved))
    regulation = GradientRegulation(str(saved))
    with pytest.raises(BackboneMismatchError):
        regulation.setup(None, PromptClassifier(backbone, COOP, ["a", "b"]), "fit")


def test_cli_meta_trains_from_the_shipped_config_and_any_method_uses_the_result(tiny_model_dir, pair_folder, dassl_folder,
                                                                                tmp_path):
    from vlprompt.cli import main
    from vlprompt.resources import bundled_dir

    configs = bundled_dir("configs")
    meta = tmp_path / "meta"
    main(["fit", "--config", str(configs / "gram" / "shapeworld_coop.yaml"),
          f"--model.init_args.backbone.init_args.model_name=local-dir:{tiny_model_dir}",
          "--model.init_args.n_way=3", "--model.init_args.k_shot=2", "--model.init_args.q_query=3",
          "--model.init_args.n_domains=2", "--model.init_args.classes_per_domain=4", "--model.init_args.min_class_size=3",
          "--data=vlprompt.data.ImageTextPairsDataModule", f"--data.source={pair_folder}", "--data.episodes_per_epoch=4",
          "--data.num_workers=0", "--trainer.max_epochs=1", f"--trainer.default_root_dir={tmp_path}",
          f"--save_prompt={meta}"])
    assert (meta / "prompt.safetensors").is_file() and (meta / "regulator.safetensors").is_file()
    main(["fit", "--config", str(configs / "gram" / "shapeworld_unigram.yaml"),  # UNIGRAM: text + visual prompts
          f"--model.init_args.backbone.init_args.model_name=local-dir:{tiny_model_dir}",
          "--model.init_args.n_way=3", "--model.init_args.k_shot=2", "--model.init_args.q_query=3",
          "--model.init_args.n_domains=2", "--model.init_args.classes_per_domain=4", "--model.init_args.min_class_size=3",
          "--model.init_args.inner_steps=1", "--data=vlprompt.data.ImageTextPairsDataModule", f"--data.source={pair_folder}",
          "--data.episodes_per_epoch=2", "--data.episodes_per_batch=1", "--data.num_workers=0", "--trainer.max_epochs=1",
          f"--trainer.default_root_dir={tmp_path / 'unigram'}", f"--save_prompt={tmp_path / 'unigram-meta'}"])
    assert json.loads((tmp_path / "unigram-meta" / "config.json").read_text())["method"] == "ivlp"
    # CoOp few-shot from the meta-prompt, its gradients regulated: switched on from the command line.
    backbone_yaml = tmp_path / "backbone.yaml"
    backbone_yaml.write_text(f"model:\n  backbone:\n    class_path: vlprompt.backbones.OpenCLIPBackbone\n"
                             f"    init_args: {{model_name: 'local-dir:{tiny_model_dir}'}}\n")
    main(["fit", "--config", str(configs / "methods" / "coop.yaml"), "--config", str(backbone_yaml),
          "--model.prompt_learner.init_args.n_ctx=4", f"--model.init_prompt={meta}",
          "--trainer.callbacks+=vlprompt.methods.GradientRegulation", f"--trainer.callbacks.meta_prompt={meta}",
          "--data", "vlprompt.data.FewShotDataModule", f"--data.root={dassl_folder}", "--data.shots=2",
          "--data.num_workers=0", "--data.batch_size=4", "--trainer.max_epochs=1", "--trainer.accelerator=cpu",
          f"--trainer.default_root_dir={tmp_path / 'downstream'}", f"--save_prompt={tmp_path / 'tuned'}"])
    assert (tmp_path / "tuned" / "prompt.safetensors").is_file()


def test_a_resumed_meta_training_with_loader_workers_continues_the_episodes(backbone, pair_folder, tmp_path):
    # Lightning starts the first epoch's loader workers before restoring the epoch from the
    # checkpoint: without redrawing, the resumed epoch would repeat epoch 0's episodes.
    def run(checkpoints, stop_after=None, ckpt_path=None):
        seen = []

        class Recording(GRAMMetaLearner):
            def training_step(self, episodes, batch_idx):
                seen.append((self.current_epoch, [ep["support"].tolist() for ep in episodes]))
                return super().training_step(episodes, batch_idx)

        class Stop(pl.Callback):
            def on_train_epoch_end(self, trainer, pl_module):
                trainer.should_stop = stop_after is not None and trainer.current_epoch >= stop_after

        pl.seed_everything(0)
        model = Recording(backbone, COOP, n_way=3, k_shot=2, q_query=3, n_domains=2, classes_per_domain=4,
                          min_class_size=3, inner_steps=1, inner_lr=0.5)
        dm = ImageTextPairsDataModule(str(pair_folder), episodes_per_epoch=4, episodes_per_batch=2, num_workers=2)
        pl.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                   callbacks=[Stop(), ModelCheckpoint(dirpath=tmp_path / checkpoints, save_last=True)],
                   default_root_dir=tmp_path).fit(model, datamodule=dm, ckpt_path=ckpt_path)
        return seen, model.prompt_learner.ctx.detach().clone()

    uninterrupted, ctx = run("full")
    run("interrupted", stop_after=1)
    resumed, resumed_ctx = run("interrupted", ckpt_path=str(tmp_path / "interrupted" / "last.ckpt"))
    assert resumed == [step for step in uninterrupted if step[0] == 2]
    assert torch.equal(resumed_ctx, ctx)
