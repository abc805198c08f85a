"""Walks the catalogue of bad inputs in docs/errors.md: each row's command must end with exit
code 2, one line on stderr containing the quoted text, no traceback, and nothing written."""

import gzip
import json
import os
import re
import shlex
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pyro_vae.cli import main
from pyro_vae.models.kind import MODEL_SETTINGS

from .test_run_lock import hold_lock

DOC = Path(__file__).resolve().parents[1] / "docs" / "errors.md"
ROW = re.compile(r"^\| (\d+) \| (.+?) \| `pyro-vae (.+?)` \| `(.+?)` \|$")
CATALOGUE = [m.groups() for m in map(ROW.match, DOC.read_text().splitlines()) if m]


class _Payload:
    """Unpickling this runs `touch MARKER` — what a crafted checkpoint could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def _write_idx(path: Path, array: np.ndarray, cut: int = 0) -> None:
    raw = bytes([0, 0, 8, array.ndim]) + np.asarray(array.shape, ">u4").tobytes() + array.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw[: len(raw) - cut] if cut else raw))


def _idx_dir(root: Path, cut: int = 0, magic: bytes | None = None) -> None:
    images = np.zeros((4, 28, 28), np.uint8)
    labels = np.zeros(4, np.uint8)
    for stem in ("train", "t10k"):
        _write_idx(root / f"{stem}-images-idx3-ubyte.gz", images, cut)
        _write_idx(root / f"{stem}-labels-idx1-ubyte.gz", labels)
    if magic is not None:
        path = root / "train-images-idx3-ubyte.gz"
        path.write_bytes(gzip.compress(magic + gzip.decompress(path.read_bytes())[4:]))


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory, digits_run):
    """The files the catalogue names, in one folder."""
    f = tmp_path_factory.mktemp("fixtures")
    np.save(f / "strings.npy", np.array(["a", "b", "c"]))
    np.save(f / "onedim.npy", np.linspace(0, 1, 10, dtype=np.float32))
    np.save(f / "fivedim.npy", np.zeros((10, 1, 1, 4, 4), np.float32))
    np.save(f / "empty.npy", np.zeros((0, 4, 4), np.float32))
    np.save(f / "nan.npy", np.full((20, 4, 4), np.nan, np.float32))
    np.save(f / "out_of_range.npy", np.full((20, 4, 4), 2.0, np.float32))
    np.save(f / "tiny.npy", np.zeros((20, 3, 3), np.float32))
    np.save(f / "wide.npy", np.zeros((20, 8, 6), np.float32))
    np.save(f / "channels_last_2.npy", np.zeros((20, 8, 8, 2), np.float32))
    np.savez(f / "wrong_keys.npz", images=np.zeros((10, 4, 4), np.float32))
    (f / "corrupt.npy").write_bytes(b"\x93NUMPY garbage" * 3)
    (f / "bad.yaml").write_text("epochs: [1\n")
    (f / "list.yaml").write_text("- epochs\n- 3\n")
    (f / "unknown_key.yaml").write_text("epoch: 3\n")
    (f / "wrong_type.json").write_text('{"epochs": "3"}')
    _idx_dir(f / "idx_truncated", cut=100)
    _idx_dir(f / "idx_bad_magic", magic=b"\x01\x02\x08\x03")
    (f / "images_broken" / "cats").mkdir(parents=True)
    Image.new("L", (8, 8)).save(f / "images_broken" / "cats" / "good.png")
    (f / "images_broken" / "cats" / "bad.png").write_bytes(b"not a png at all")
    (f / "images_ok" / "cats").mkdir(parents=True)
    for i in range(6):
        Image.new("L", (8, 8), 40 * i).save(f / "images_ok" / "cats" / f"{i}.png")
    (f / "images_flat").mkdir()
    Image.new("L", (8, 8)).save(f / "images_flat" / "lonely.png")
    (f / "taken").mkdir()
    (f / "taken" / "notes.txt").write_text("someone's files")
    shutil.copytree(digits_run, f / "run_ok")
    for name in ("run_no_checkpoint", "run_corrupt", "run_truncated", "run_evil", "run_foreign",
                 "run_bad_config"):
        shutil.copytree(digits_run, f / name)
    (f / "run_no_checkpoint" / "checkpoint.pt").unlink()
    (f / "run_corrupt" / "checkpoint.pt").write_bytes(os.urandom(2000))
    ckpt = (f / "run_truncated" / "checkpoint.pt").read_bytes()
    (f / "run_truncated" / "checkpoint.pt").write_bytes(ckpt[: len(ckpt) // 2])
    torch.save({"model": _Payload(f / "PWNED")}, f / "run_evil" / "checkpoint.pt")
    torch.save({"weights": torch.zeros(3)}, f / "run_foreign" / "checkpoint.pt")
    (f / "run_bad_config" / "config.json").write_text("{ not json")
    (f / "plugins").mkdir()
    (f / "plugins" / "broken_plugin.py").write_text("raise RuntimeError('this plugin is broken')\n")
    (f / "plugins" / "clashing_plugin.py").write_text(
        "import pyro_vae\npyro_vae.register_prior('normal', lambda **options: None)\n")
    base = "base: {train_size: 200, test_size: 40, epochs: 1}\n"
    (f / "grid_unknown_key.yaml").write_text(base + "sweep: {prior: [normal]}\nepochs: 3\n")
    (f / "grid_empty_list.yaml").write_text(base + "sweep: {prior: []}\n")
    (f / "grid_refused.yaml").write_text("base: {beta: 0.5}\nsweep: {estimator: [mc, iwae]}\n")
    (f / "grid_ok.yaml").write_text(base + "sweep: {seed: [0]}\n")
    shutil.copytree(digits_run, f / "run_no_seconds")  # evaluated, its epochs' wall times removed
    assert main(["evaluate", str(f / "run_no_seconds"), "--eval-k", "2", "--quiet"]) == 0
    metrics = [json.loads(line) for line in (f / "run_no_seconds" / "metrics.jsonl").read_text().splitlines()]
    (f / "run_no_seconds" / "metrics.jsonl").write_text(
        "".join(json.dumps({k: v for k, v in m.items() if k != "seconds"}) + "\n" for m in metrics))
    shutil.copytree(digits_run, f / "run_not_evaluated")
    for name in ("eval.json", "eval_examples.pt"):
        (f / "run_not_evaluated" / name).unlink(missing_ok=True)
    small = ["--labels", "20", "--epochs", "1", "--train-size", "200", "--test-size", "40", "--hidden", "16",
             "--quiet"]
    for model, latent in (("m2", ["--z-dim", "2", "--eval-k", "2"]), ("classifier", [])):  # it has no z
        assert main(["train", "--model", model, *small, *latent, "--out", str(f / f"run_{model}")]) == 0
    (f / "m2.yaml").write_text("model: m2\nlabels: 20\n")
    for condition in ("class", "quadrants:1"):  # conditional VAE runs, evaluated (report reads them)
        run = f / f"run_cvae_{condition.replace(':', '')}"
        assert main(["train", "--model", "cvae", "--condition", condition, "--epochs", "1", "--train-size",
                     "200", "--test-size", "40", "--hidden", "16", "--z-dim", "2", "--eval-k", "2", "--quiet",
                     "--out", str(run)]) == 0
        assert main(["evaluate", str(run), "--k", "2", "--quiet"]) == 0
    assert main(["train", "--model", "nn-baseline", "--condition", "quadrants:1", "--epochs", "1",
                 "--train-size", "200", "--test-size", "40", "--hidden", "16", "--quiet",
                 "--out", str(f / "run_nn_baseline")]) == 0
    assert main(["train", "--model", "ae", "--epochs", "1", "--train-size", "200", "--test-size", "40",
                 "--hidden", "16", "--quiet", "--out", str(f / "run_ae")]) == 0  # codes without scales
    shutil.copytree(digits_run, f / "run_pair")  # config.json as a run of a user's pair records it
    record = {k: v for k, v in json.loads((digits_run / "config.json").read_text()).items()
              if k not in MODEL_SETTINGS}
    record["pair"] = {"name": "my_vae.ExampleVAE", "latent_sites": ["latent"], "observed_site": "obs"}
    (f / "run_pair" / "config.json").write_text(json.dumps(record))
    _broken_runs(f, digits_run)
    holder = hold_lock(f / "run_locked")  # another writer, in its own process
    yield f
    holder.kill()
    holder.wait()


def _edit_config(run: Path, **changes) -> None:
    """Change settings in RUN/config.json (None: remove the setting)."""
    record = json.loads((run / "config.json").read_text())
    record.update(changes)
    (run / "config.json").write_text(json.dumps({k: v for k, v in record.items() if k not in changes
                                                 or changes[k] is not None}))


def _broken_runs(f: Path, digits_run: Path) -> None:
    """Runs whose files are corrupt, of another version, or disagree with each other."""
    for name in ("run_not_utf8", "run_z_dim_edited", "run_newer_config", "run_older_config", "run_bad_step",
                 "run_x_shape", "run_locked", "run_x_shape_2d", "run_bad_best"):
        shutil.copytree(digits_run, f / name)
    _edit_config(f / "run_x_shape_2d", x_shape=[8, 8])
    (f / "run_bad_best" / "best.pt").write_bytes(b"PK\x03\x04 not a whole zip")
    evaluated = f / "run_evaluated"  # what report reads: eval.json and eval_examples.pt too
    shutil.copytree(digits_run, evaluated)
    assert main(["evaluate", str(evaluated), "--eval-k", "2", "--quiet"]) == 0
    for name in ("run_bad_metrics", "run_bad_summary", "run_eval_list", "run_metrics_no_epoch",
                 "run_metrics_text", "run_eval_no_size", "run_eval_stamp"):
        shutil.copytree(evaluated, f / name)
    (f / "run_metrics_no_epoch" / "metrics.jsonl").write_text('{"step": 4, "train_loss": 60.0}\n')
    (f / "run_metrics_text" / "metrics.jsonl").write_text('{"epoch": 1, "step": 4, "train_loss": null}\n')
    record = json.loads((evaluated / "eval.json").read_text())
    (f / "run_eval_no_size" / "eval.json").write_text(json.dumps({**record, "n_examples": None}))
    stamp = {"checkpoint": "checkpoint.pt"}  # no epoch, no step
    (f / "run_eval_stamp" / "eval.json").write_text(json.dumps({**record, "model_checkpoint": stamp}))
    (f / "run_not_utf8" / "config.json").write_bytes(b'{"dataset": "digits\xff"}')
    _edit_config(f / "run_z_dim_edited", z_dim=5)
    _edit_config(f / "run_newer_config", decoder_dropout=0.1)
    _edit_config(f / "run_older_config", z_dim=None)
    (f / "run_bad_metrics" / "metrics.jsonl").write_text('{"epoch": 1, "step": 4}\n{"epoch": 2, "st\n')
    (f / "run_bad_summary" / "summary.json").write_text("{ not json")
    (f / "run_eval_list" / "eval.json").write_text("[1, 2]")
    state = torch.load(f / "run_bad_step" / "checkpoint.pt", weights_only=True)
    torch.save({**state, "step": "many"}, f / "run_bad_step" / "checkpoint.pt")
    _edit_config(f / "run_x_shape", x_shape=[1, 4, 4])



def test_the_catalogue_has_at_least_20_distinct_bad_inputs():
    assert len(CATALOGUE) >= 20
    assert [int(row[0]) for row in CATALOGUE] == list(range(1, len(CATALOGUE) + 1))


@pytest.mark.parametrize("number, what, command, expected", CATALOGUE, ids=[r[1] for r in CATALOGUE])
def test_bad_input(number, what, command, expected, fixtures, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.syspath_prepend(str(fixtures / "plugins"))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # no __pycache__ among the fixtures
    before = {p: p.stat().st_mtime_ns for p in fixtures.rglob("*")}
    argv = [a.replace("FIXTURES", str(fixtures)) for a in shlex.split(command)]
    out = tmp_path / "out"
    if argv[0] == "train" and "--out" not in argv and "--resume" not in argv:
        argv += ["--out", str(out)]
    assert main([*argv, "--quiet"] if argv[0] == "train" else argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("pyro-vae: error: ") and err.count("\n") == 1, err
    assert expected in err, err
    assert "Traceback" not in err
    assert not out.exists()
    after = {p: p.stat().st_mtime_ns for p in fixtures.rglob("*")}
    assert after == before, "a bad input changed files"
    assert not (fixtures / "PWNED").exists()


def test_the_crafted_checkpoint_would_run_code_if_loaded_unsafely(fixtures, tmp_path):
    """Proof that row 47's payload is real: an unsafe load runs it (and only here, on purpose)."""
    marker = tmp_path / "PWNED"
    torch.save({"model": _Payload(marker)}, tmp_path / "evil.pt")
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")  # torch's, on random bytes
def test_any_random_bytes_as_a_checkpoint_are_refused_as_input(tmp_path):
    """Bytes that are not a zip fall to the legacy unpickler, which fails in many ways (IndexError,
    KeyError, struct.error, ...): every one must become the one-line InputError."""
    from pyro_vae.errors import InputError
    from pyro_vae.training.run_dir import load_checkpoint

    path = tmp_path / "checkpoint.pt"
    rng = np.random.default_rng(0)
    for size in [1, 2, 7, 64, 2000] * 60:
        path.write_bytes(rng.bytes(size))
        with pytest.raises(InputError, match="corrupt or truncated|a weights-only load refuses"):
            load_checkpoint(path)
