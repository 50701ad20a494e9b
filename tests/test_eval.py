"""Few-shot evaluation runner, result tables and plots."""

from __future__ import annotations

import csv

import pytest

from vlprompt.apps.fewshot import FewShotEvaluation, format_report, run_fewshot_eval
from vlprompt.eval.plots import plot_accuracy_vs_shots
from vlprompt.eval.tables import Result, base_novel_table, harmonic_mean, shots_table, summarise


def test_harmonic_mean_and_summary():
    assert harmonic_mean(80.0, 60.0) == pytest.approx(68.571, abs=1e-3)
    assert harmonic_mean(0.0, 0.0) == 0.0
    results = [Result("coop", 4, s, "all", a) for s, a in ((1, 70.0), (2, 74.0))]
    mean, std, n = summarise(results)[("coop", 4, "all")]
    assert (mean, n) == (72.0, 2) and std == pytest.approx(2.828, abs=1e-3)


def test_tables_and_plot(tmp_path):
    results = [
        Result("zeroshot", 0, 0, "all", 50.0),
        Result("zeroshot", 0, 0, "base", 55.0),
        Result("zeroshot", 0, 0, "novel", 45.0),
        *[Result("coop", k, 1, "all", 50.0 + 5 * k) for k in (1, 2, 4)],
        Result("coop", 4, 1, "base", 80.0),
        Result("coop", 4, 1, "novel", 40.0),
    ]
    table = shots_table(results, ["zeroshot", "coop"])
    assert "| coop | 55.0 | 60.0 | 70.0 |" in table and "| zeroshot | 50.0 | 50.0 | 50.0 |" in table
    assert "| coop | 80.0 | 40.0 | 53.3 |" in base_novel_table(results, ["zeroshot", "coop"])
    png = plot_accuracy_vs_shots(results, tmp_path / "plot.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = format_report(results).splitlines()
    assert "  coop                 80.0   40.0   53.3" in report
    assert "  all classes | coop 4-shot         70.0%" in report


def test_runner_end_to_end_on_a_tiny_model(tmp_path, tiny_model_dir, dassl_folder):
    cfg = FewShotEvaluation(
        backbone={"model_name": f"local-dir:{tiny_model_dir}"},
        data={"root": str(dassl_folder), "num_workers": 0, "batch_size": 4},
        methods={"coop": {"prompt_learner": {"class_path": "vlprompt.prompts.CoOpPromptLearner", "init_args": {"n_ctx": 2}},
                          "max_epochs": 1}},
        shots=[1, 2],
        seeds=[1, 2],
        base_to_novel={"shots": 2},
        trainer={"accelerator": "cpu"},
    )
    results = run_fewshot_eval(cfg, tmp_path / "out")
    settings = sorted({(r.method, r.shots, r.setting) for r in results})
    assert ("zeroshot", 0, "novel") in settings and ("coop", 2, "novel") in settings and ("coop", 1, "all") in settings
    assert len([r for r in results if r.method == "coop"]) == 2 * 2 + 2 * 2  # shots x seeds + (base, novel) x seeds
    rows = list(csv.DictReader((tmp_path / "out" / "results.csv").open()))
    assert len(rows) == len(results)
    assert "Base-to-novel" in (tmp_path / "out" / "summary.md").read_text()
    assert (tmp_path / "out" / "accuracy_vs_shots.png").is_file()
    with pytest.raises(FileExistsError, match="--overwrite"):
        run_fewshot_eval(cfg, tmp_path / "out")
