"""Benchmark results are files: each JSON records its run; the committed markdown is what the generator writes."""

from __future__ import annotations

import json

import pytest
import torch

from aimonk.benchmark import report

README = report.DEFAULT_DIR.parents[1] / "README.md"


def test_committed_markdown_and_readme_table_are_generated_from_the_committed_json():
    assert sorted(report.DEFAULT_DIR.glob("*.json")), "no benchmark JSON committed under reports/benchmarks/"
    files = report.render_all(report.DEFAULT_DIR, README)
    assert report.orphan_tables(report.DEFAULT_DIR, files) == []
    for path, text in files.items():
        assert path.exists(), f"{path} missing: run `python -m aimonk.benchmark report`"
        assert path.read_text() == text, f"{path} is not what `python -m aimonk.benchmark report` writes"


def test_every_committed_json_records_machine_versions_command_and_date():
    for name, record in report.load_records(report.DEFAULT_DIR).items():
        for run in record["runs"]:
            assert run["machine"]["cpu"] and run["machine"]["cores"] >= 1, name
            assert {"python", "torch", "aimonk", "git_commit"} <= set(run["versions"]), name
            command = {"deployed": "speed"}.get(record["benchmark"], record["benchmark"])  # speed --model M
            assert run["command"].startswith(f"python -m aimonk.benchmark {command} "), name
            assert run["date"][:2] == "20", name


def test_run_info_describes_the_run():
    info = report.run_info("quality", ["--data", "some dir", "--folds", "3"])
    assert info["command"] == "python -m aimonk.benchmark quality --data 'some dir' --folds 3"
    assert info["machine"]["cores"] >= 1 and info["machine"]["cpu"]
    assert info["versions"]["aimonk"] and info["versions"]["torch"]
    json.dumps(info)  # JSON-ready
    # One model name ("AMD EPYC") covers CPUs with and without bf16: the tables say which one ran.
    machine = info["machine"]
    assert machine["cpu_capability"] == torch.backends.cpu.get_cpu_capability()  # e.g. AVX2, AVX512
    bf16 = "bf16" if machine["native_bf16"] else "no bf16"
    assert report.cpu_text(machine) == f"{machine['cpu']} ({machine['cpu_capability']}, {bf16})"
    older = {k: v for k, v in machine.items() if k not in ("cpu_capability", "native_bf16")}
    assert report.cpu_text(older) == machine["cpu"]  # a run recorded before these fields


def _quality_record(auc: float, chance: float = 0.5) -> dict:
    rows = []
    for fold, wobble in enumerate((-0.01, 0.0, 0.01)):
        rows.append({"recipe": "majority", "fold": fold, "minutes": 0.0, "macro_ap": 0.3, "macro_auc": 0.5,
                     "macro_f1_at_0.5": 0.6, "macro_f1_tuned": 0.6, "chance_auc": 0.5, "n_fallback": 0})
        rows.append({"recipe": "pretrained", "fold": fold, "minutes": 10.0, "macro_ap": 0.5 + wobble,
                     "macro_auc": auc + wobble, "macro_f1_at_0.5": 0.5, "macro_f1_tuned": 0.6,
                     "chance_auc": chance, "n_fallback": 4 if auc < 0.6 else 0})
    run = report.run_info("quality", ["--data", "d"])
    return {"benchmark": "quality", "run": run, "data": "d", "folds": 3, "rows": rows}


@pytest.mark.parametrize("auc, verdict",
                         [(0.94, "**learned signal**"), (0.51, "**no signal**"), (0.47, "**no signal**")])
def test_quality_markdown_says_whether_there_is_signal(auc, verdict):
    text = report.render_quality(_quality_record(auc), "q.json")
    assert f"- pretrained: {verdict}" in text
    assert "| majority | 0.300 ± 0.000 | 0.500 ± 0.000 |" in text
    assert "macro AP 0.490 / 0.500 / 0.510" in text
    glance = report.render_glance({"q.json": _quality_record(auc)})
    assert ("no signal" in glance) == (auc < 0.6)


def test_quality_markdown_times_the_default_recipe_against_the_one_it_was_cut_from():
    record = _quality_record(0.94)
    previous = [{**row, "recipe": "pretrained_12ep", "minutes": m}
                for row, m in zip([r for r in record["rows"] if r["recipe"] == "pretrained"], (29.0, 30.0, 40.0))]
    record["rows"] += previous
    text = report.render_quality(record, "q.json")
    # medians per fold: 10 against 30 minutes
    assert "`pretrained` 10.0 min against `pretrained_12ep` 30.0 min, **0.33x** the time" in text
    assert "- pretrained_12ep: macro AP 0.490 / 0.500 / 0.510; minutes 29.0 / 30.0 / 40.0;" in text
    glance = report.render_glance({"q.json": record})
    assert "10.0 min per fold (0.33x `pretrained_12ep`'s 30.0 min, in turns)" in glance
    assert "time" not in report.render_quality(_quality_record(0.94), "q.json").split("Per fold")[1].lower()


def test_quality_markdown_compares_each_runtime_row_with_torch_fp32_fold_by_fold():
    record = _quality_record(0.94)
    base = [r for r in record["rows"] if r["recipe"] == "pretrained"]
    record["rows"] += [{**row, "recipe": "pretrained on openvino bf16", "minutes": 0.0,
                        "macro_ap": row["macro_ap"] + d, "max_abs_diff_vs_torch": dp, "decision_flips_vs_torch": n}
                       for row, d, dp, n in zip(base, (-0.002, 0.0, 0.001), (0.1, 0.02, 0.05), (3, 0, 1))]
    text = report.render_quality(record, "q.json")
    line = next(x for x in text.splitlines() if x.startswith("- pretrained on openvino bf16:"))
    assert "max |Δp| 1.0e-01 / 2.0e-02 / 5.0e-02, decision flips 3 / 0 / 1" in line
    assert "macro AP minus torch fp32's -0.0020 / +0.0000 / +0.0010" in line
    assert "minus torch" not in next(x for x in text.splitlines() if x.startswith("- pretrained: "))


def test_the_glance_row_names_the_epochs_a_recipe_ran():
    record = _quality_record(0.94)
    assert "`pretrained`, 3-fold" in report.render_glance({"q.json": record})  # older rows: no epoch record
    for row in record["rows"]:
        row["val_ap_by_epoch"] = [0.5, 0.6, 0.7] if row["recipe"] == "pretrained" else []
    assert "`pretrained` (3 epochs), 3-fold" in report.render_glance({"q.json": record})


def test_speed_markdown_quotes_both_loops_and_their_ratio():
    loop = {"train_first": 10.0, "train_steady": 12.0, "infer": 30.0, "infer_model_only": 40.0, "latency_ms": 20.0,
            "peak_rss_mb": 1000.0, "train_share_bf16_peak": 0.4, "infer_model_only_share_bf16_peak": 0.5}
    record = {"benchmark": "speed", "run": report.run_info("speed", ["--data", "d"]),
              "config": {"data_dir": "d", "image_size": 224, "batch_size": 16, "backbone": "resnet18", "epochs": 3,
                         "peak_size": 4096},
              "device": "cpu", "threads": 2, "precision": "bf16", "n_images": 10, "load_average": [1.0, 2.0],
              "peak_flops": {"bf16": 4e11, "fp32": 2e11}, "original": loop,
              "project": {**loop, "train_steady": 30.0}, "ratios": {"train_steady": 2.5}}
    text = report.render_speed(record, "s.json")
    assert "| training, steady state (img/s, median of epochs 2..N) | 12.0 | 30.0 | 2.50x |" in text
    assert "| inference from image files (img/s) | 30.0 | 30.0 | 1.00x |" in text  # a ratio missing from the JSON
    assert "int8" not in text.split("|---|")[1]  # no int8 rows without int8 figures
    assert "training 2.50x (30.0 img/s)" in report.render_glance({"s.json": record})
    cores = record["run"]["machine"]["cores"]
    for load, busy in ([0.5, 0.9], False), ([cores, cores + 0.1], False), ([cores + 1.0, 2.0 * cores], True):
        record["load_average"] = load
        assert ("busy machine" in report.render_glance({"s.json": record})) == busy
        assert ("The machine was busy" in report.render_speed(record, "s.json")) == busy


def test_check_fails_on_a_hand_edited_table_and_the_generator_repairs_it(tmp_path, capsys):
    (tmp_path / "q.json").write_text(json.dumps(_quality_record(0.9)))
    assert report.main(["--dir", str(tmp_path), "--readme", ""]) == 0
    assert report.main(["--dir", str(tmp_path), "--readme", "", "--check"]) == 0
    md = tmp_path / "q.md"
    md.write_text(md.read_text().replace("0.900", "0.950"))
    assert report.main(["--dir", str(tmp_path), "--readme", "", "--check"]) == 1
    assert "out of date" in capsys.readouterr().err
    assert report.main(["--dir", str(tmp_path), "--readme", ""]) == 0
    assert "0.950" not in md.read_text()


def test_a_json_without_its_run_record_is_refused(tmp_path, capsys):
    (tmp_path / "old.json").write_text(json.dumps([{"recipe": "majority", "fold": 0}]))
    assert report.main(["--dir", str(tmp_path), "--readme", ""]) == 1
    assert "old.json: not a benchmark record" in capsys.readouterr().err


def test_check_flags_a_table_whose_json_is_gone(tmp_path, capsys):
    (tmp_path / "q.json").write_text(json.dumps(_quality_record(0.9)))
    assert report.main(["--dir", str(tmp_path), "--readme", ""]) == 0
    (tmp_path / "q.json").rename(tmp_path / "r.json")
    assert report.main(["--dir", str(tmp_path), "--readme", ""]) == 0
    capsys.readouterr()
    assert report.main(["--dir", str(tmp_path), "--readme", "", "--check"]) == 1
    err = capsys.readouterr().err
    assert "no JSON for" in err and "q.md" in err


def test_folds_run_in_separate_processes_are_merged_into_one_table(tmp_path):
    whole = _quality_record(0.9)
    for fold in range(3):
        part = {**whole, "rows": [r for r in whole["rows"] if r["fold"] == fold]}
        (tmp_path / f"quality_x_fold{fold}.json").write_text(json.dumps(part))
    records = report.load_records(tmp_path)
    assert list(records) == ["quality_x.json"] and len(records["quality_x.json"]["runs"]) == 3
    text = report.render_quality(records["quality_x.json"], "parts")
    tables = [t.split("Held-out fold scores")[1] for t in (text, report.render_quality(whole, "parts"))]
    assert tables[0] == tables[1]  # the same figures as one process scoring every fold
    assert text.count("  - `python -m aimonk.benchmark quality") == 3
    assert "# Quality: `d`, 3-fold CV" in text and "macro AP 0.490 / 0.500 / 0.510" in text
    (tmp_path / "quality_x_fold2.json").unlink()
    text = report.render_quality(report.load_records(tmp_path)["quality_x.json"], "parts")
    assert "2 of 3 CV folds (unfinished)" in text
    # a screening on fewer folds has its own file but no row in the glance, which quotes finished runs only
    assert report.render_glance(report.load_records(tmp_path)).count("\n") == 2  # the header lines alone
