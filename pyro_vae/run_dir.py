"""The run directory contract: config.json, metrics.jsonl, checkpoint.pt, summary.json, eval.json
and figures. Files are written atomically (temp file, fsync, rename) and checkpoints are loaded
with torch.load(weights_only=True) only, so a crafted file cannot run code."""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from pathlib import Path

import torch

from .config import Config
from .errors import InputError
from .model import VAE, build_vae

CONFIG = "config.json"
METRICS = "metrics.jsonl"
CHECKPOINT = "checkpoint.pt"
SUMMARY = "summary.json"
EVAL = "eval.json"


def _atomic_write(path: Path, write) -> None:
    """Call write(file) on a temp file beside `path`, fsync it, then rename it over `path`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: dict) -> None:
    """Write `obj` as indented JSON, atomically."""
    _atomic_write(Path(path), lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def append_jsonl(path: Path, row: dict) -> None:
    """Append one JSON object as a line and flush it to disk."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Replace a JSON-lines file with `rows`, atomically."""
    _atomic_write(Path(path), lambda f: f.write("".join(json.dumps(r) + "\n" for r in rows).encode()))


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON-lines file (none if it does not exist)."""
    if not Path(path).is_file():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save `state` atomically: a crash leaves the previous checkpoint intact."""
    _atomic_write(Path(path), lambda f: torch.save(state, f))


CHECKPOINT_KEYS = {"model", "optimizer", "epoch", "batch", "step", "epoch_generator", "epoch_total",
                   "metrics", "rng"}


def remove_stale_temp_files(run: Path) -> None:
    """Delete temp files that a process killed while writing (kill -9) left behind."""
    for tmp in Path(run).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict:
    """A checkpoint loaded with weights_only=True (tensors and plain containers, nothing else)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} does not exist: the run has no checkpoint yet; train it first")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # noqa: BLE001 - bytes that are not a checkpoint fail in any way the unpickler likes
        refused = next((line.strip() for line in str(err).splitlines() if "GLOBAL" in line), None)
        if isinstance(err, pickle.UnpicklingError) and refused:  # the file wants to run code
            raise InputError(
                f"{path} holds objects that a weights-only load refuses ({refused}); it was not "
                "written by pyro-vae and was not loaded"
            ) from None
        raise InputError(f"{path} is corrupt or truncated ({type(err).__name__}); "
                         "restore it from a backup or train again") from None
    if not isinstance(state, dict) or not CHECKPOINT_KEYS <= set(state):
        raise InputError(f"{path} is not a pyro-vae checkpoint (missing "
                         f"{', '.join(sorted(CHECKPOINT_KEYS - set(state or {})))}); train again")
    return state


def read_config(run: Path) -> tuple[Config, tuple[int, int, int]]:
    """The Config and the example shape (C, H, W) recorded in RUN/config.json."""
    run = Path(run)
    if not (run / CONFIG).is_file():
        raise InputError(f"{run} is not a pyro-vae run directory (no {CONFIG}); "
                         "pass the --out directory of a `pyro-vae train` run")
    try:
        values = json.loads((run / CONFIG).read_text())
        x_shape = tuple(values.pop("x_shape"))
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise InputError(f"{run / CONFIG} is corrupt ({type(err).__name__}); it cannot be read") from None
    return Config.from_dict(values), x_shape


def config_record(config: Config, x_shape: tuple[int, ...]) -> dict:
    """What config.json holds: every setting plus the example shape, enough to rebuild the model."""
    return {**config.to_dict(), "x_shape": list(x_shape)}


def build_from_config(config: Config, x_shape: tuple[int, ...]) -> VAE:
    """The (untrained) VAE that `config` describes."""
    return build_vae(
        x_shape, encoder=config.encoder, hidden=config.hidden, z_dim=config.z_dim,
        prior=config.prior, likelihood=config.likelihood, sigma=config.sigma,
        sigma_mode=config.sigma_mode, prior_components=config.prior_components, model=config.model,
    )


def load_model(run: Path, device: torch.device | str = "cpu") -> tuple[Config, VAE]:
    """The trained VAE of a run directory, in eval mode on `device`."""
    config, x_shape = read_config(run)
    vae = build_from_config(config, x_shape)
    state = load_checkpoint(Path(run) / CHECKPOINT, device)
    try:
        vae.load_state_dict(state["model"])
    except (KeyError, RuntimeError, TypeError) as err:
        raise InputError(f"{Path(run) / CHECKPOINT} does not match {CONFIG} "
                         f"({type(err).__name__}); the run directory is inconsistent") from None
    return config, vae.to(device).eval()
