"""scripts/cvae_quadrants.py: the quadrant-completion table, one row per number of given quadrants, each
cell the mean over seeds of the runs' summaries."""

import json
import statistics
import sys
from pathlib import Path

import pyro

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))

import cvae_quadrants as script  # noqa: E402


def test_the_table_holds_each_quadrant_counts_mean_over_seeds(tmp_path):
    out = tmp_path / "table"
    text = script.main(["--dataset", "digits", "--given", "1", "3", "--seeds", "0", "1", "--epochs", "1",
                        "--train-size", "200", "--test-size", "30", "--hidden", "16", "--z-dim", "2",
                        "--eval-k", "5", "--out", str(out)])
    pyro.clear_param_store()
    results = json.loads((out / "results.json").read_text())["results"]
    assert [(r["given"], r["seed"]) for r in results] == [(1, 0), (1, 1), (3, 0), (3, 1)]
    rows = [line for line in text.splitlines() if line.startswith("| 1 |") or line.startswith("| 3 |")]
    assert len(rows) == 2
    for row, given in zip(rows, (1, 3), strict=True):
        cells = row.strip("|").split("|")
        baseline = float(cells[2].split("±")[0])
        assert baseline == round(statistics.mean(r["baseline"] for r in results if r["given"] == given), 3)
    assert (out / "completions_3_1.png").is_file() and (out / "table.md").read_text() == text
