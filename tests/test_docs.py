"""The Python examples in docs/usage.md run as written (in a temporary working directory)."""

import re
from pathlib import Path

import pytest

from .conftest import unregister_all

USAGE = Path(__file__).resolve().parents[1] / "docs" / "usage.md"
BLOCKS = re.findall(r"```python\n(.*?)```", USAGE.read_text(), flags=re.S)


def test_usage_has_python_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_usage_example_runs(index, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    try:
        exec(compile(BLOCKS[index], f"docs/usage.md example {index}", "exec"), {})
    finally:  # an example may register a prior, likelihood or estimator: later tests must not see it
        unregister_all()
    printed = capsys.readouterr().out
    numbers = [float(v) for v in re.findall(r"-?\d+\.\d+", printed)]
    assert numbers and all(v < 0 for v in numbers if abs(v) > 1e-9)  # bounds are negative nats
