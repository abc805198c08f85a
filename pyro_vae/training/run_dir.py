"""The run directory contract: config.json, metrics.jsonl, checkpoint.pt, summary.json, eval.json
and figures. Files are written atomically (temp file, fsync, rename) and checkpoints are loaded
with torch.load(weights_only=True) only, so a crafted file cannot run code.

A run of a user's own model/guide pair records the pair in config.json ("pair": its class and sites)
and its parameters in checkpoint.pt by their names in Pyro's param store. Such a run cannot be rebuilt
from its files (the code of the pair is the user's), so the command line refuses it; from Python,
`load_pair` restores the parameters into the pair, in place."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
from dataclasses import fields
from datetime import datetime
from pathlib import Path

import pyro
import torch
from torch import Tensor, nn

from ..config import ADDED_SETTINGS, Config
from ..errors import InputError
from ..inference.program import Program, Sites
from ..models.kind import MODEL_SETTINGS, check_config, model_kind

CONFIG = "config.json"
METRICS = "metrics.jsonl"
CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"  # with --early-stop: the parameters of the epoch with the best validation ELBO
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


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Replace a JSON-lines file with `rows`, atomically."""
    _atomic_write(Path(path), lambda f: f.write("".join(json.dumps(r) + "\n" for r in rows).encode()))


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON-lines file (none if it does not exist); an InputError naming the first line
    that is not a JSON object."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:  # not UTF-8, or not JSON
            row = None
        if not isinstance(row, dict):
            raise InputError(f"{path} is corrupt (line {number} is not a JSON object); restore it from a "
                             "backup, or train the run again")
        rows.append(row)
    return rows


NUMBER = (int, float, type(None))  # a measured value in a run file (None where it does not apply)
# what eval.json's entries hold (evaluate writes them; report reads them)
EVAL_FIELDS = {"n_examples": int, "test_fingerprint": str, "model_checkpoint": (dict, type(None)),
               **{name: NUMBER for name in ("log_px", "log_px_se", "test_elbo", "test_elbo_se", "kl", "kl_se",
                                            "recon", "recon_se", "mse", "mse_se", "active_units", "k",
                                            "test_accuracy", "test_accuracy_se")}}
STAMP_FIELDS = {"checkpoint": str, "epoch": int, "step": int}  # model_stamp's record


def check_fields(path: Path, record: dict, types: dict, required: tuple[str, ...] = (),
                 where: str = "") -> dict:
    """`record`, read from `path`, if each of `types`' entries it holds has its type (bool is not a
    number here) and the `required` ones are there; else an InputError naming the file (and `where` in
    it) and the entry: another version of pyro-vae wrote it, or it was edited."""
    missing = [name for name in required if name not in record]
    wrong = [name for name, kind in types.items() if name in record
             and (not isinstance(record[name], kind) or isinstance(record[name], bool))]
    if missing or wrong:
        what = f"no {missing[0]}" if missing else f"{wrong[0]} is {record[wrong[0]]!r}"
        raise InputError(f"{path}{where} is not as pyro-vae writes it ({what}); write it again (train or "
                         "evaluate the run again)")
    return record


def read_metrics(path: Path) -> list[dict]:
    """RUN/metrics.jsonl: one row per epoch, each with its epoch, step and train loss, every value a
    number (or null where it does not apply); an InputError naming the first line that is not."""
    rows = read_jsonl(path)
    for number, row in enumerate(rows, 1):
        types = {k: NUMBER for k in row} | {"epoch": int, "step": int, "train_loss": (int, float)}
        check_fields(path, row, types, required=("epoch", "step", "train_loss"), where=f" line {number}")
    return rows


def read_json(path: Path) -> dict:
    """A JSON object from a run file (summary.json, eval.json, ...); an InputError if it is not one."""
    path = Path(path)
    try:
        value = json.loads(path.read_bytes())
    except (OSError, ValueError) as err:  # ValueError: not UTF-8, or not JSON
        raise InputError(f"{path} cannot be read ({type(err).__name__}); write it again (train or evaluate "
                         "the run again)") from None
    if not isinstance(value, dict):
        raise InputError(f"{path} is corrupt (it holds a {type(value).__name__}, not a JSON object); write "
                         "it again (train or evaluate the run again)")
    return value


def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save `state` atomically: a crash leaves the previous checkpoint intact."""
    _atomic_write(Path(path), lambda f: torch.save(state, f))


CHECKPOINT_KEYS = {"model", "optimizer", "epoch", "batch", "step", "epoch_generator", "epoch_total",
                   "metrics", "rng"}
BEST_KEYS = {"model", "epoch", "step"}
VALIDATION_KEYS = ("validation_elbo", "validation_accuracy")  # best.pt's validation measures, where measured
# what each entry of a checkpoint holds (checked on load: a file of another version or an edited one is
# refused, not half-used)
CHECKPOINT_TYPES = {"model": dict, "optimizer": dict, "epoch": int, "batch": int, "step": int,
                    "epoch_generator": Tensor, "epoch_total": Tensor, "metrics": list, "rng": dict,
                    "validation_elbo": (int, float), "validation_accuracy": (int, float)}


def model_file(run: Path) -> Path:
    """The file holding the parameters that a run's results describe: RUN/best.pt where early stopping
    kept one, else RUN/checkpoint.pt."""
    best = Path(run) / BEST
    return best if best.is_file() else Path(run) / CHECKPOINT


def remove_stale_temp_files(run: Path) -> None:
    """Delete temp files that a process killed while writing (kill -9) left behind."""
    for tmp in Path(run).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict:
    """A checkpoint (or best.pt) loaded with weights_only=True (tensors and plain containers only)."""
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
    keys = BEST_KEYS if path.name == BEST else CHECKPOINT_KEYS
    if not isinstance(state, dict) or not keys <= set(state):
        missing = sorted(keys - set(state)) if isinstance(state, dict) else sorted(keys)
        raise InputError(f"{path} is not a pyro-vae checkpoint (missing {', '.join(missing)}); train again")
    wrong = sorted(k for k in keys.union(VALIDATION_KEYS).intersection(state)
                   if not isinstance(state[k], CHECKPOINT_TYPES[k]) or isinstance(state[k], bool))
    if wrong:
        raise InputError(f"{path} is not a pyro-vae checkpoint ({', '.join(wrong)} of the wrong type); "
                         "train again")
    return state


def load_parameters(module: nn.Module, saved: dict, path: Path) -> None:
    """Load the checkpointed parameters `saved` (read from `path`) into pyro-vae's own model; an
    InputError if they do not fit it (config.json and the checkpoint disagree)."""
    try:
        module.load_state_dict(saved)
    except (KeyError, RuntimeError, TypeError) as err:
        raise InputError(f"{path} does not match {CONFIG} ({type(err).__name__}: "
                         f"{str(err).strip().splitlines()[-1].strip()[:120]}); the run directory is "
                         "inconsistent (was config.json edited?): restore it, or train again") from None


def empty_directory(path: Path) -> None:
    """Delete everything inside directory `path` (if it exists), keeping the directory itself."""
    path = Path(path)
    if not path.is_dir():
        return
    for entry in path.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def check_run_dir(out: str | Path | None, overwrite: bool = False) -> Path:
    """`out`, or runs/<timestamp>. A non-empty directory is refused, except a pyro-vae run with
    `overwrite` (it is emptied only once the new run is ready to start)."""
    path = Path(out) if out else Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        if not (overwrite and (path / CONFIG).is_file()):
            what = "holds another run" if (path / CONFIG).is_file() else "is not an empty directory"
            hint = "pass --overwrite to replace it, " if (path / CONFIG).is_file() else ""
            raise InputError(f"{path} already exists and {what}; {hint}choose another --out, "
                             "or continue that run with --resume")
    return path


def read_record(run: Path) -> dict:
    """RUN/config.json as written (settings, x_shape, and for a user's pair, "pair")."""
    run = Path(run)
    if not (run / CONFIG).is_file():
        raise InputError(f"{run} is not a pyro-vae run directory (no {CONFIG}); "
                         "pass the --out directory of a `pyro-vae train` run")
    try:
        values = json.loads((run / CONFIG).read_bytes())
        shape = values["x_shape"] if isinstance(values, dict) else None
        if not isinstance(shape, list) or len(shape) != 3 or not all(type(n) is int and n > 0 for n in shape):
            raise TypeError("not a mapping with x_shape (C, H, W)")
    except (OSError, ValueError, KeyError, TypeError) as err:  # ValueError: not UTF-8, or not JSON
        raise InputError(f"{run / CONFIG} is corrupt ({type(err).__name__}); it cannot be read") from None
    return values


def check_data_shape(run: Path, shape: tuple[int, ...]) -> None:
    """Refuse data whose examples do not have the shape RUN/config.json records (x_shape)."""
    recorded = tuple(read_record(run)["x_shape"])
    if recorded != tuple(shape):
        raise InputError(f"{Path(run) / CONFIG} records examples of shape {list(recorded)}, but the data "
                         f"read now are {list(shape)}: the dataset changed (or config.json was edited); "
                         "point --data-dir at the data the run trained on")


def recorded_pair(run: Path) -> dict | None:
    """What RUN/config.json says about a user's own model/guide pair, or None for pyro-vae's VAE."""
    return read_record(run).get("pair")


def read_config(run: Path, pair: bool = False) -> tuple[Config, tuple[int, int, int]]:
    """The Config and the example shape (C, H, W) recorded in RUN/config.json (of a run of pyro-vae's
    own VAE: a user's pair cannot be rebuilt from the file, and is refused, unless pair=True: the
    caller brings the pair, and reads only the settings)."""
    values = read_record(run)
    own_networks: set[str] = set()  # settings a run does not record: a pair brings its own networks
    if "pair" in values and pair:
        values.pop("pair")
        own_networks = set(MODEL_SETTINGS)
    elif "pair" in values:
        name = values["pair"].get("name", "?") if isinstance(values["pair"], dict) else "?"
        raise InputError(f"{run} trained your own model/guide pair ({name}), which cannot be rebuilt from "
                         f"the run directory: use the Python API with the pair ({evaluate_pair_hint(run)}; "
                         "train(..., program=pair, resume=True) to continue)")
    x_shape = tuple(values.pop("x_shape"))
    values = {**ADDED_SETTINGS, **values}  # an older run ran with these before they were settings
    names = {f.name for f in fields(Config)}
    unknown, missing = sorted(set(values) - names), sorted(names - set(values) - own_networks)
    if unknown or missing:
        what = "; ".join(part for part in (unknown and f"unknown setting(s) {', '.join(unknown)}",
                                           missing and f"no value for {', '.join(missing)}") if part)
        raise InputError(f"{Path(run) / CONFIG} was not written by this version of pyro-vae ({what}); use "
                         "the version that wrote it, or train the run again")
    try:
        return check_config(Config.from_dict(values)), x_shape
    except InputError as err:
        raise InputError(f"{Path(run) / CONFIG}: {err}") from None


def evaluate_pair_hint(run: Path) -> str:
    """The Python call that evaluates a run of a user's own pair (for messages: the CLI cannot)."""
    return f"pyro_vae.evaluate_run({str(run)!r}, program=<the same pair>)"


def config_record(config: Config, x_shape: tuple[int, ...], pair: dict | None = None) -> dict:
    """What config.json holds: every setting plus the example shape, enough to rebuild the model; for
    a user's own pair (`pair`, see describe_pair), the settings that apply to it and the pair."""
    if pair is None:
        return {**config.to_dict(), "x_shape": list(x_shape)}
    settings = {k: v for k, v in config.to_dict().items() if k not in MODEL_SETTINGS}
    return {**settings, "x_shape": list(x_shape), "pair": pair}


def describe_pair(program: Program, sites: Sites) -> dict:
    """A user's pair as config.json records it: the class (or model function) and its sites."""
    made = program.owner if program.owner is not None else program.model
    kind = made if callable(made) and hasattr(made, "__qualname__") else type(made)
    return {"name": f"{kind.__module__}.{kind.__qualname__}", "latent_sites": list(sites.latent),
            "observed_site": sites.observed}


def pair_parameters(program: Program, x: Tensor) -> dict[str, Tensor]:
    """The tensors a user's pair trains, by name (Program.parameters on x); refused if there are none."""
    params = program.parameters(x)
    if not params:
        raise InputError("the model/guide pair has no parameters in Pyro's param store: register its "
                         "networks with pyro.module (or use PyroModule, or pyro.param)")
    return params


def restore_parameters(params: dict[str, Tensor], saved: dict[str, Tensor], path: Path) -> None:
    """Copy the checkpointed values `saved` into the pair's tensors `params` (same names), in place."""
    if set(saved) != set(params) or any(saved[n].shape != p.shape for n, p in params.items()):
        differ = sorted(set(saved) ^ set(params)) or [n for n in params if saved[n].shape != params[n].shape]
        raise InputError(f"{path} does not hold this pair's parameters (they differ in "
                         f"{', '.join(differ[:3])}{', ...' if len(differ) > 3 else ''}); pass the pair "
                         "the run trained, built the same way")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name])


def load_pair(run: Path, pair: object, device: torch.device | str = "cpu") -> Program:
    """Restore the trained parameters of a run of a user's own pair into `pair` (an object with .model
    and .guide, or a Program: the pair the run trained, built the same way), in place; returns it as a
    Program. The pair's parameters are found by tracing it once on a batch of zeros."""
    run = Path(run)
    record = read_record(run)
    if "pair" not in record:
        raise InputError(f"{run} trained pyro-vae's own VAE, not a pair of yours: load it with load_model")
    program = Program.of(pair)
    if isinstance(program.owner, nn.Module):
        program.owner.to(device)
    with pyro.validation_enabled(False):  # zeros need not lie in the likelihood's support
        params = pair_parameters(program, torch.zeros(2, *record["x_shape"], device=device))
    restore_parameters(params, load_checkpoint(model_file(run), device)["model"], model_file(run))
    return program


def build_from_config(config: Config, x_shape: tuple[int, ...]) -> nn.Module:
    """The (untrained) model that `config` describes: its kind's (config.model) build."""
    return model_kind(config.model).build(config, x_shape)


def load_model(run: Path, device: torch.device | str = "cpu") -> tuple[Config, nn.Module]:
    """The trained model of a run directory (best.pt where early stopping kept one, else checkpoint.pt:
    `model_file`), in eval mode on `device`; its kind is model_kind(config.model)."""
    config, x_shape = read_config(run)
    model = build_from_config(config, x_shape)
    load_parameters(model, load_checkpoint(model_file(run), device)["model"], model_file(run))
    return config, model.to(device).eval()


EVAL_EXAMPLES = "eval_examples.pt"
STALE = "stale"
# what evaluate, compare and diagnose write about the model at one checkpoint
RESULT_FILES = ("eval.json", EVAL_EXAMPLES, "compare.json", "compare.md", "compare_*.png", "compare-train",
                "diagnose.json", "diagnose.md", "diagnose_*.png", "diagnose_posterior.nc")


def model_stamp(run: Path, checkpoint: str | None = None) -> dict:
    """Which model a result file describes: the file (by default model_file's: best.pt where early
    stopping kept one, which is what evaluate, sample, compare and diagnose load), the epochs it had
    completed, its step (and, for a checkpoint written mid-epoch, the batch inside the next epoch)."""
    path = model_file(run) if checkpoint is None else Path(run) / checkpoint
    state = load_checkpoint(path)
    if path.name == BEST:  # written at the end of its epoch
        return {"checkpoint": BEST, "epoch": int(state["epoch"]), "step": int(state["step"])}
    stamp = {"checkpoint": path.name, "epoch": int(state["epoch"]) - 1, "step": int(state["step"])}
    return {**stamp, "batch": int(state["batch"])} if int(state["batch"]) else stamp


def retire_results(run: Path) -> list[Path]:
    """Move the result files of an older model (RESULT_FILES) into RUN/stale/, replacing what an earlier
    resume put there; returns their new paths. Called when training continues a run."""
    run = Path(run)
    found = [p for pattern in RESULT_FILES for p in sorted(run.glob(pattern))]
    if not found:
        return []
    stale = run / STALE
    if stale.exists():
        shutil.rmtree(stale)
    stale.mkdir()
    return [p.rename(stale / p.name) for p in found]
