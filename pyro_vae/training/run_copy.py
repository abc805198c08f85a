"""A trained run scored on another test set: a new run directory holding the run's model file,
metrics.jsonl and summary.json, and its config.json with one setting changed (`heldout`: which draw of
the held-out images is the test set), ready for `pyro-vae evaluate`. The run itself is left as it was,
so its eval.json keeps describing its own test set, and the pair (run, copy) is what
scripts/draw_shift.py compares: the same model on two draws of the same images."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from ..config import HELDOUT_MODES
from ..errors import InputError
from ..models.kind import check_config
from ..staging import write_all_or_none
from .run_dir import CONFIG, METRICS, SUMMARY, model_file, read_config, read_record, write_json


def copy_run(run: str | Path, out: str | Path, heldout: str, pair: bool = False) -> Path:
    """Copy RUN's model file (best.pt, else checkpoint.pt), metrics.jsonl and summary.json to the new
    directory `out`, with config.json's "heldout" set to `heldout`; returns `out`. Written all or none
    (staging.write_all_or_none): never a half-written copy. InputError (nothing written) for an `out` that
    exists and is not empty, a run without a model file, a `heldout` the run already has or that its
    settings refuse (--heldout authors needs a validation set), or, unless `pair`, a run of a user's own
    model/guide pair (the command line cannot evaluate one)."""
    run, out = Path(run), Path(out)
    config = read_config(run, pair=pair)[0]
    if heldout not in HELDOUT_MODES:
        raise InputError(f"--heldout {heldout} is not one of {', '.join(HELDOUT_MODES)}")
    if config.heldout == heldout:
        raise InputError(f"{run} already holds out its test set as '{heldout}'; evaluate it in place "
                         "(pyro-vae evaluate RUN), or name the other draw")
    check_config(dataclasses.replace(config, heldout=heldout))
    source = model_file(run)
    if not source.is_file():
        raise InputError(f"{run} has no trained model yet (no {source.name}); train it first")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{out} already exists and is not an empty directory; choose another --out")

    def write(staging: Path) -> list[Path]:
        copied = [Path(shutil.copy2(path, staging / path.name))
                  for path in (source, run / METRICS, run / SUMMARY) if path.is_file()]
        write_json(staging / CONFIG, {**read_record(run), "heldout": heldout})
        return [*copied, staging / CONFIG]  # config.json moved last: a run directory only once complete

    write_all_or_none(out, write)
    return out
