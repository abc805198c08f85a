"""Two CPU processes under torchrun (gloo) train what one process trains on the same global batches:
the same parameters, Adam moments and metrics up to float32 rounding, including across a resume and
with an image folder streamed by DataLoader workers; only rank 0 writes. The reparameterization noise
is fixed at 0 in both runs (the runner below), since each process draws its own; what is left to
differ is the order of floating-point sums. One process streaming a folder trains bit-identically to
one holding it on the device."""

import importlib
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributions.normal

from pyro_vae.cli import main
from pyro_vae.training.distributed import Ranks

# 249 examples in global batches of 64: 64, 64, 64, 57; the last splits 29 + 28 over two processes
RUN = ["--device", "cpu", "--train-size", "249", "--test-size", "64", "--batch-size", "64",
       "--hidden", "32", "--eval-k", "5", "--quiet"]
# an image folder of 2 x 30 8x8 images (10% held out): 54 training images in batches of 16
FOLDER = ["--dataset", "images", "--image-size", "8", "--binarize", "none", "--batch-size", "16",
          "--device", "cpu", "--hidden", "16", "--eval-k", "5", "--quiet"]

RUNNER = textwrap.dedent("""
    import importlib, os, sys
    import torch, torch.distributions.normal
    from pyro_vae.cli import main
    FOLDER = %r

    torch.distributions.normal._standard_normal = (
        lambda shape, dtype, device: torch.zeros(shape, dtype=dtype, device=device))
    log = open(f"{sys.argv[1]}/writes-rank{os.environ.get('RANK', '0')}.txt", "a")

    def recorded(module, name):
        real = getattr(module, name)
        def write(*args, **kwargs):
            print(name, file=log, flush=True)
            return real(*args, **kwargs)
        return write

    # where the trainer writes
    for module in ("pyro_vae.training.checkpoints", "pyro_vae.training.epoch_report"):
        module = importlib.import_module(module)
        for name in ("save_checkpoint", "write_json", "write_jsonl"):
            if hasattr(module, name):
                setattr(module, name, recorded(module, name))
    root, run = sys.argv[1], sys.argv[2:]
    code = main(["train", "--epochs", "1", "--out", f"{root}/two", *run])
    code = code or main(["train", "--resume", f"{root}/two", "--epochs", "2", "--quiet"])
    streamed = ["train", "--epochs", "2", "--out", f"{root}/two-streamed", *FOLDER, "--workers", "1"]
    sys.exit(code or main(streamed))
""") % FOLDER


def _zero_noise(shape, dtype, device):
    return torch.zeros(shape, dtype=dtype, device=device)


def _read(run: Path):
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return ckpt, rows, json.loads((run / "summary.json").read_text())


def _image_folder(root: Path) -> None:
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(30):
            pixels = (torch.rand(8, 8, generator=gen) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels, mode="L").save(root / label / f"{i}.png")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    _image_folder(root / "images")
    runner = root / "runner.py"
    runner.write_text(RUNNER)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(runner), str(root), *RUN],
        capture_output=True, text=True, timeout=600, cwd=root,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setattr(torch.distributions.normal, "_standard_normal", _zero_noise)
        assert main(["train", "--epochs", "2", "--out", "one", *RUN]) == 0
        assert main(["train", "--epochs", "2", "--out", "one-on-device", *FOLDER]) == 0
    return root


def test_two_processes_train_what_one_process_trains(runs):
    """Tolerances: float32 sums in another order differ by ~1e-7 relative; after 8 Adam steps of
    lr 1e-3 the parameters agree to 1e-6 (a wrong gradient direction moves them by ~1e-3). Adam's
    moments see the gradient's scale, which its update does not: they catch a wrong average."""
    (one, rows_one, summary_one), (two, rows_two, summary_two) = _read(runs / "one"), _read(runs / "two")
    assert summary_two["processes"] == 2 and summary_one["processes"] == 1
    assert summary_one["steps"] == summary_two["steps"] == 8
    for a, b in zip(rows_one, rows_two, strict=True):
        assert a["step"] == b["step"]
        for key in ("train_loss", "test_elbo"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), key
    for name, value in one["model"].items():
        torch.testing.assert_close(two["model"][name], value, rtol=0, atol=1e-6, msg=name)
    for i, state in one["optimizer"]["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(two["optimizer"]["state"][i][key], state[key], rtol=1e-4, atol=1e-8)
    assert len(two["rng_ranks"]) == 2


def test_two_processes_streaming_a_folder_train_what_one_process_holding_it_trains(runs):
    (one, rows_one, _), (two, rows_two, _) = _read(runs / "one-on-device"), _read(runs / "two-streamed")
    assert [r["step"] for r in rows_two] == [r["step"] for r in rows_one] == [4, 8]
    for a, b in zip(rows_one, rows_two, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
    for name, value in one["model"].items():
        torch.testing.assert_close(two["model"][name], value, rtol=0, atol=1e-6, msg=name)


def test_one_process_streaming_a_folder_trains_bit_identically(runs, monkeypatch):
    monkeypatch.chdir(runs)
    monkeypatch.setattr(torch.distributions.normal, "_standard_normal", _zero_noise)
    assert main(["train", "--epochs", "2", "--out", "one-streamed", *FOLDER, "--workers", "2"]) == 0
    device_run, rows_a, _ = _read(runs / "one-on-device")
    streamed, rows_b, _ = _read(runs / "one-streamed")
    for a, b in zip(rows_a, rows_b, strict=True):
        a.pop("seconds"), b.pop("seconds")
        assert a == b
    assert all(torch.equal(device_run["model"][k], streamed["model"][k]) for k in device_run["model"])


def test_an_unreadable_image_met_mid_epoch_stops_with_a_checkpoint_that_resumes_exactly(
        runs, tmp_path, monkeypatch, capsys):
    """A training image that is not an image: one line naming the file (exit 1), a checkpoint after
    the last good step; once the file is readable again, --resume finishes the same run as one that
    never stopped (the run on the device, bit-identical to streaming by the test above)."""
    from pyro_vae.data import _source, image_folder_parts

    shutil.copytree(runs / "images", tmp_path / "images")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.distributions.normal, "_standard_normal", _zero_noise)
    train_part, _ = image_folder_parts(Path("images"), 8)  # as --dataset images names it
    bad = Path(_source(train_part, 40))
    good_bytes = bad.read_bytes()
    bad.write_bytes(b"not an image")
    assert main(["train", "--epochs", "2", "--out", "stopped", *FOLDER, "--workers", "1"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"cannot read image {bad}" in err and "pyro-vae train --resume stopped" in err
    assert (tmp_path / "stopped" / "checkpoint.pt").is_file()
    bad.write_bytes(good_bytes)
    assert main(["train", "--resume", "stopped", "--quiet"]) == 0
    device_run, _, _ = _read(runs / "one-on-device")
    resumed, _, _ = _read(tmp_path / "stopped")
    assert all(torch.equal(device_run["model"][k], resumed["model"][k]) for k in device_run["model"])


def test_only_rank_0_writes(runs):
    assert (runs / "writes-rank0.txt").read_text().count("save_checkpoint") >= 2
    assert (runs / "writes-rank1.txt").read_text() == ""  # rank 1 ran (its log exists) and wrote nothing


def test_each_process_takes_its_contiguous_share_of_a_global_batch():
    idx = torch.arange(57)
    parts = [Ranks(r, 2).shard(idx) for r in range(2)]
    assert [len(p) for p in parts] == [29, 28] and torch.equal(torch.cat(parts), idx)
    assert torch.equal(Ranks().shard(idx), idx)
    assert Ranks(0, 2).drops_last(65, 64)  # a last batch of 1 example: none for rank 1
    assert not Ranks(0, 2).drops_last(249, 64)
    assert not Ranks().drops_last(65, 64)


def test_alone_the_helpers_change_nothing():
    ranks, value = Ranks(), torch.tensor(3.0)
    assert ranks.sum(value) is value and ranks.max(value) is value
    assert ranks.agree(7, 2, 0) == [2, 0] and ranks.gather("x") == ["x"]
    assert importlib.import_module("pyro_vae.training.distributed").start(torch.device("cpu"))[0] == Ranks()
