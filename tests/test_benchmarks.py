"""The benchmark scripts at tiny sizes: they run, write their files, and their tables have the
right shape. Speed is not asserted here; benchmarks/RESULTS.md records the real runs."""

import json
import re
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def benchmarks(monkeypatch):
    """Import the scripts as modules (they import their sibling ``common``)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import accuracy_grid
    import overhead
    import scaling

    return {"accuracy_grid": accuracy_grid, "overhead": overhead, "scaling": scaling}


def _table_rows(markdown: str) -> list[list[str]]:
    return [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in markdown.splitlines()
        if line.startswith("|") and not line.startswith("|---")
    ]


def test_accuracy_grid_tiny_writes_tables_and_resumes(benchmarks, cifar_dir, tmp_path):
    grid = benchmarks["accuracy_grid"]
    cells = ["baseline", "CST", "all"]  # three of the six keep the suite short
    args = ["--tiny", "--data", str(cifar_dir), "--cache", str(tmp_path / "cache"),
            "--results", str(tmp_path / "results"), "--test-dir", str(cifar_dir),
            "--cells", ",".join(cells), "--threads", "1"]
    report = grid.main(args)

    markdown = (tmp_path / "results" / "accuracy_grid_tiny.md").read_text()
    saved = json.loads((tmp_path / "results" / "accuracy_grid_tiny.json").read_text())
    assert list(saved["runs"]) == cells
    assert all(len(runs) == 2 for runs in saved["runs"].values())
    for runs in saved["runs"].values():
        for run in runs:
            assert {"final_top1", "best_top1", "final_ece", "wall_seconds", "test"} <= set(run)
            assert 0.0 <= run["final_top1"] <= 100.0
    rows = _table_rows(markdown)
    # the GCT.md-like table: a header naming every cell, a validation and a test row
    assert rows[0] == ["top-1 %", *cells]
    assert len(rows[1]) == len(rows[2]) == 1 + len(cells)
    assert re.fullmatch(r"\d+\.\d\d ± \d+\.\d\d", rows[1][1])
    assert re.fullmatch(r"\d+\.\d\d ± \d+\.\d\d \([+-]\d+\.\d\d ± \d+\.\d\d\)", rows[1][2])
    # the detail table: one row per cell
    detail = rows[3:]
    assert detail[0][0] == "cell" and [row[0] for row in detail[1:]] == cells
    assert not list((tmp_path / "cache" / "runs").rglob("*.pt"))

    # a second call finds every run cached and trains nothing
    cached = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache" / "results").glob("*.json")}
    assert len(cached) == 2 * len(cells)
    again = grid.main(args)
    assert {p: p.stat().st_mtime_ns for p in cached} == cached
    assert again["stats"] == report["stats"]


def test_accuracy_grid_jobs_train_in_child_processes(benchmarks, cifar_dir, tmp_path,
                                                    monkeypatch):
    grid = benchmarks["accuracy_grid"]
    # only the children may train: this process fails if it tries
    monkeypatch.setattr(grid, "pretrain", lambda config: pytest.fail("the parent trained"))
    args = ["--tiny", "--data", str(cifar_dir), "--cache", str(tmp_path / "cache"),
            "--results", str(tmp_path / "results"), "--cells", "baseline,CWD", "--jobs", "2"]
    report = grid.main(args)
    # the children cached all four runs; this process only read them back for the report
    assert len(list((tmp_path / "cache" / "results").glob("*.json"))) == 4
    assert report["plan"]["jobs"] == 2
    assert {run["settings"]["seed"] for run in report["runs"]["CWD"]} == {0, 1}
    rows = _table_rows((tmp_path / "results" / "accuracy_grid_tiny.md").read_text())
    assert rows[0] == ["top-1 %", "baseline", "CWD"]


def test_overhead_tiny_reports_ratios(benchmarks, cifar_dir, tmp_path):
    out = tmp_path / "overhead.json"
    report = benchmarks["overhead"].main([
        "--steps", "2", "--repeats", "2", "--warmup", "1", "--batch-size", "8",
        "--data", str(cifar_dir), "--per-class", "16", "--val-per-class", "8",
        "--workers", "0", "--loader-epochs", "2", "--threads", "1", "--out", str(out),
    ])
    saved = json.loads(out.read_text())
    assert saved["step"]["step"]["median_ratio"] == report["step"]["step"]["median_ratio"] > 0
    assert saved["step"]["epoch_loop"]["median_ratio"] > 0
    assert len(saved["step"]["raw_seconds"]["steps"]["gctkd"]) == 2
    # every knob moved off its constant: the step ran with all of them
    knobs = saved["step"]["knobs_at_end"]
    assert {"weight_decay", "temperature", "clip", "momentum", "focal"} <= set(knobs)
    loader = saved["loader"]
    assert loader["same_transform"] is True
    assert loader["images_per_epoch"] == {"gctkd": 160, "timm": 160}
    assert loader["throughput_ratio_gctkd_over_timm"] > 0
    for name in ("gctkd", "timm"):
        assert loader["peak_rss_mib"][name]["main_peak_mib"] > 0


def test_scaling_tiny_tables(benchmarks, tmp_path):
    scaling = benchmarks["scaling"]
    scaling.main([
        "--models", "resnet20", "--batch-sizes", "4", "--knob-batch-size", "4", "--steps", "1",
        "--repeats", "2", "--memory-repeats", "1", "--threads", "1",
        "--out", str(tmp_path / "scaling"),
    ])
    saved = json.loads((tmp_path / "scaling.json").read_text())
    assert [row["knobs"] for row in saved["knobs"]["resnet20"]] == list(range(6))
    assert [(row["batch_size"], row["knobs"]) for row in saved["batch"]] == [(4, 5), (4, 0)]
    rows = _table_rows((tmp_path / "scaling.md").read_text())
    assert rows[0][:3] == ["model", "knobs", "added"] and len(rows) == 1 + 6 + 1 + 2
