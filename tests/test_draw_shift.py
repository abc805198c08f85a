"""scripts/draw_shift.py: one model's two evaluations on two binarizations of the same test images,
paired per image; the shift over models is averaged per image first, since the models share the draws."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from pyro_vae.errors import InputError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import draw_shift as script  # noqa: E402

N = 400


def record(path: Path, log_px: torch.Tensor | None, fingerprint: str, epoch: int = 7, seed: int = 3) -> Path:
    """A run directory holding config.json (the seed, and the test set named by the fingerprint) and what
    an evaluation writes: eval.json and eval_examples.pt (none with log_px None: not evaluated)."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"seed": seed, "heldout": fingerprint, "z_dim": 40,
                                                     "x_shape": [1, 28, 28]}))
    if log_px is None:
        return path
    torch.save({"log_px": log_px, "elbo": log_px - 2.0}, path / "eval_examples.pt")
    (path / "eval.json").write_text(json.dumps({
        "log_px": float(log_px.mean()), "n_examples": len(log_px), "k": 50, "test_fingerprint": fingerprint,
        "examples_file": "eval_examples.pt",
        "model_checkpoint": {"checkpoint": "best.pt", "epoch": epoch, "step": 500 * epoch}}))
    return path


@pytest.fixture
def pairs(tmp_path):
    g = torch.Generator().manual_seed(0)
    draw_noise = torch.randn(N, generator=g, dtype=torch.float64)  # the other draw's per-image change, shared
    out = []
    for m, level in enumerate((-100.0, -101.0, -99.5)):
        ours = level + torch.randn(N, generator=g, dtype=torch.float64)
        other = ours + 0.2 + draw_noise + 0.1 * torch.randn(N, generator=g, dtype=torch.float64)
        a, b = record(tmp_path / f"m{m}", ours, "ours"), record(tmp_path / f"m{m}-other", other, "theirs")
        out.append((a, b, ours, other))
    return out


def test_shift_is_paired_per_image_and_averaged_over_models_per_image(pairs, capsys):
    result = script.main([f"{a}:{b}" for a, b, _, _ in pairs])
    for got, (_, _, ours, other) in zip(result["pairs"], pairs, strict=True):
        d = other - ours
        assert got["shift"] == pytest.approx(float(d.mean()))
        assert got["shift_se"] == pytest.approx(float(d.std() / math.sqrt(N)))
        assert got["log_px_b"] == pytest.approx(float(other.mean()))
    per_image = torch.stack([other - ours for _, _, ours, other in pairs]).mean(0)
    assert result["shift"] == pytest.approx(float(per_image.mean()))
    assert result["shift_se_images"] == pytest.approx(float(per_image.std() / math.sqrt(N)))
    # the shared draw noise does not average out over models: the s.e. is that of one model's shift,
    # not a third of its variance (what treating the models' shifts as independent would give)
    one = result["pairs"][0]["shift_se"]
    assert result["shift_se_images"] > 0.8 * one
    levels = torch.tensor([p["log_px_a"] for p in result["pairs"]], dtype=torch.float64)
    assert result["log_px_a"] == pytest.approx(float(levels.mean()))
    assert result["log_px_a_se"] == pytest.approx(float(levels.std() / math.sqrt(3)))
    assert "B - A" in capsys.readouterr().out


def test_a_pair_of_two_models_or_one_draw_or_other_images_is_refused(tmp_path):
    x = torch.zeros(N, dtype=torch.float64)
    a = record(tmp_path / "a", x, "ours")
    with pytest.raises(InputError, match="other models"):
        script.pair_shift(a, record(tmp_path / "later", x, "theirs", epoch=8))
    with pytest.raises(InputError, match="same test draw"):
        script.pair_shift(a, record(tmp_path / "same", x, "ours"))
    with pytest.raises(InputError, match="numbers of test images"):
        script.pair_shift(a, record(tmp_path / "fewer", x[:10], "theirs"))
    with pytest.raises(InputError, match="has not been evaluated"):
        script.pair_shift(a, record(tmp_path / "unevaluated", None, "theirs"))


def test_two_runs_stopped_at_the_same_step_are_not_one_model(tmp_path):
    x = torch.zeros(N, dtype=torch.float64)
    a = record(tmp_path / "a", x, "ours")
    with pytest.raises(InputError, match=r"other settings \(seed\)"):
        script.pair_shift(a, record(tmp_path / "b", x, "theirs", seed=4))
    # the same run's config with the test set switched
    assert script.pair_shift(a, record(tmp_path / "c", x, "theirs"))["shift"] == 0.0


def test_the_command_line_names_the_refused_pair_without_a_traceback(tmp_path):
    x = torch.zeros(N, dtype=torch.float64)
    a, b = record(tmp_path / "a", x, "ours"), record(tmp_path / "b", x, "theirs", epoch=9)
    with pytest.raises(SystemExit, match="draw_shift: .* scored other models"):
        script.main([f"{a}:{b}"])
    with pytest.raises(SystemExit, match="is not A:B"):
        script.main([str(a)])
