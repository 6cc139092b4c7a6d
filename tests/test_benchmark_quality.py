"""Smoke run of the quality benchmark on the embedded sample (tiny settings; figures are checked for sanity only)."""

import tempfile

import numpy as np
import pytest

from aimonk import config
from aimonk.benchmark import quality


@pytest.mark.slow
def test_quality_benchmark_runs_every_row_on_the_same_folds(tmp_path, monkeypatch):
    df = quality.run(str(config.SAMPLE_DIR), ["original", "pretrained", "frozen_lr"], folds=2, epochs=1, image_size=32,
                     workdir=str(tmp_path), runtimes=())  # the exported runtimes: tests/test_export.py
    assert sorted(df.recipe.unique()) == ["frozen_lr", "frozen_lr with flip TTA", "majority", "original",
                                          "original in int8", "original with flip TTA", "pretrained",
                                          "pretrained with flip TTA"]
    assert (df.groupby("recipe").fold.nunique() == 2).all()
    # Each recipe trained with a decoded-image cache of its own, so none found what the one before it stored.
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["frozen_lr", "original", "pretrained"]
    assert all(any(p.rglob("*.npy")) for p in (tmp_path / "cache").iterdir())
    for col in ("macro_ap", "macro_auc", "macro_f1_at_0.5", "macro_f1_tuned", "chance_auc"):
        values = df[col].to_numpy(float)
        assert np.all((values >= 0) & (values <= 1)), col
    majority = df[df.recipe == "majority"]
    assert np.allclose(majority.macro_auc, 0.5)
    # Chance reference: shuffled labels give an AUC near 0.5 whatever the model.
    assert np.all(np.abs(df[df.recipe != "majority"].chance_auc - 0.5) < 0.1)
    # The TTA ablation (no recipe uses flip TTA by default) scores the very same models: no training time again.
    assert (df[df.recipe.str.endswith("with flip TTA")].minutes == 0).all()
    # So does the int8 row (ResNet18 checkpoints are calibrated for it); int8 moves the scores only a little.
    assert (df[df.recipe == "original in int8"].minutes == 0).all()
    in_int8 = df[df.recipe == "original in int8"].set_index("fold")
    original = df[df.recipe == "original"].set_index("fold")
    assert np.allclose(in_int8.macro_ap, original.macro_ap, atol=0.05)
    # Each trained row says which epoch was kept and how validation AP went (1 epoch here; frozen_lr trains none).
    pretrained = df[df.recipe == "pretrained"]
    assert (pretrained.kept_epoch == 1).all() and all(len(v) == 1 for v in pretrained.val_ap_by_epoch)
    assert all(len(v) == 0 for v in df[df.recipe == "frozen_lr"].val_ap_by_epoch)
    table = quality.summary_table(df)
    assert "±" in table.loc["original", "macro_ap"]
    # One fold on its own (to spread folds over processes) is the same fold with the same scores.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    alone = quality.run(str(config.SAMPLE_DIR), ["frozen_lr"], folds=2, image_size=32, only_fold=1, runtimes=())
    assert set(alone.fold) == {1}
    assert not any((tmp_path / "tmp").iterdir())  # without a workdir the run's checkpoints are removed
    together = df[(df.fold == 1) & df.recipe.isin(["majority", "frozen_lr"])].reset_index(drop=True)
    cols = ["recipe", "macro_ap", "macro_auc", "macro_f1_tuned"]
    alone = alone[alone.recipe.isin(["majority", "frozen_lr"])].reset_index(drop=True)
    assert alone[cols].round(6).equals(together[cols].round(6))


def test_set_rejects_a_field_that_training_does_not_have(capsys):
    with pytest.raises(SystemExit) as exc:
        quality.main(["--data", str(config.SAMPLE_DIR), "--set", "lernrate=1e-3"])
    assert exc.value.code == 2
    assert "'lernrate' is not a TrainConfig field" in capsys.readouterr().err


def test_runtimes_flag_reads_pairs_and_none(capsys):
    assert quality._runtime_pairs("onnxruntime:fp32, openvino:bf16") == [("onnxruntime", "fp32"), ("openvino", "bf16")]
    assert quality._runtime_pairs("none") == []
    with pytest.raises(SystemExit):
        quality.main(["--data", str(config.SAMPLE_DIR), "--runtimes", "tensorrt:fp16"])
    assert "'tensorrt:fp16': expected RUNTIME:PRECISION" in capsys.readouterr().err
