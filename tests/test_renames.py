"""One naming rule for sample counts: --particles (samples of z per example inside an objective) and
--eval-k (importance samples per example evaluating log p(x)). The old names still work, each saying
once that it is renamed; --help shows only the new ones."""

import inspect
import json
import re
import shutil

import pyro
import pytest
import yaml

from pyro_vae.cli import build_parser, main
from pyro_vae.evaluation.compare import compare
from pyro_vae.evaluation.conditional import score_conditional
from pyro_vae.evaluation.diagnostics import diagnose
from pyro_vae.evaluation.evaluate import evaluate, evaluate_run, per_example
from pyro_vae.inference.scores import iwae_log_px
from pyro_vae.renames import renamed_keywords
from pyro_vae.sweeps.grid import overrides, read_grid, run_grid
from pyro_vae.sweeps.grid_ray import run_grid_ray
from pyro_vae.training.run_dir import load_model
from pyro_vae.training.train_data import prepare_data

# command, old flag, new flag, the values given, what the new flag's destination then holds
RENAMED_FLAGS = [
    ("evaluate", "--k", "--eval-k", ["7"], 7),
    ("diagnose", "--k", "--eval-k", ["7"], 7),
    ("grid", "--k", "--eval-k", ["7"], 7),
    ("compare", "--k-ref", "--eval-k", ["7"], 7),
    ("compare", "--particles-list", "--particles", ["1", "4"], [1, 4]),
]
POSITIONAL = {"evaluate": ["RUN"], "diagnose": ["RUN"], "grid": ["FILE"], "compare": ["RUN"]}


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


@pytest.mark.parametrize("command, old, new, values, parsed", RENAMED_FLAGS)
def test_an_old_flag_sets_the_new_one_and_says_so_once(command, old, new, values, parsed, capsys):
    args = build_parser().parse_args([command, *POSITIONAL[command], old, *values, old, *values])
    assert getattr(args, _dest(new)) == parsed
    err = capsys.readouterr().err.splitlines()
    assert err == [f"pyro-vae: warning: {old} is renamed {new}; {old} will go"]


@pytest.mark.parametrize("command, old, new, values, parsed", RENAMED_FLAGS)
def test_the_new_flag_says_nothing_and_wins_over_the_default(command, old, new, values, parsed, capsys):
    args = build_parser().parse_args([command, *POSITIONAL[command], new, *values])
    assert getattr(args, _dest(new)) == parsed
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("command", sorted(POSITIONAL))
def test_help_lists_only_the_new_names(command, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    flags = set(re.findall(r"(?<![\w-])--[a-z][\w-]*", capsys.readouterr().out))
    renamed = [(old, new) for c, old, new, _, _ in RENAMED_FLAGS if c == command]
    assert renamed
    for old, new in renamed:
        assert new in flags and old not in flags


def test_train_already_follows_the_rule(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    flags = set(re.findall(r"(?<![\w-])--[a-z][\w-]*", capsys.readouterr().out))
    assert {"--particles", "--eval-k"} <= flags and not {"--k", "--k-ref", "--particles-list"} & flags


def test_an_old_run_directory_evaluates_with_the_old_flag(digits_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(digits_run, run)
    assert main(["evaluate", str(run), "--k", "3", "--test-size", "20", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert err.count("renamed --eval-k") == 1
    assert json.loads((run / "eval.json").read_text())["k"] == 3


# public functions with a sample count: (function, old keyword, new keyword)
RENAMED_KEYWORDS = [
    (evaluate, "k", "eval_k"), (per_example, "k", "eval_k"), (evaluate_run, "k", "eval_k"),
    (iwae_log_px, "k", "eval_k"), (diagnose, "k", "eval_k"), (score_conditional, "k", "eval_k"),
    (compare, "k_ref", "eval_k"), (run_grid, "k", "eval_k"), (run_grid_ray, "k", "eval_k"),
]


@pytest.mark.parametrize("fn, old, new", RENAMED_KEYWORDS, ids=lambda v: getattr(v, "__name__", v))
def test_a_public_function_takes_the_new_keyword_and_knows_the_old(fn, old, new):
    parameters = inspect.signature(fn).parameters
    assert new in parameters and old not in parameters
    with pytest.raises(TypeError, match=f"got both {old}= and {new}="):
        fn(**{old: 2, new: 2})


def test_the_old_keyword_warns_and_gives_the_same_result(digits_run):
    config, vae = load_model(digits_run)
    x = prepare_data(config).test_x[:10]
    pyro.set_rng_seed(0)
    new = evaluate(vae, x, eval_k=4)
    pyro.set_rng_seed(0)
    with pytest.warns(DeprecationWarning, match=r"evaluate\(\): the keyword k= is renamed eval_k="):
        old = evaluate(vae, x, k=4)
    assert old == new and new["k"] == 4


def test_the_keyword_helper_warns_once_per_call_and_leaves_other_keywords_alone():
    @renamed_keywords(k="eval_k")
    def count(x, eval_k=1, k_other=0):
        return x, eval_k, k_other

    with pytest.warns(DeprecationWarning) as caught:
        assert count(1, k=5, k_other=2) == (1, 5, 2)
    assert len(caught) == 1
    assert count(1, 3) == (1, 3, 0)


def test_grid_eval_k_sets_every_run_else_the_grid_file_does(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({"base": {"eval_k": 5}, "sweep": {"seed": [0, 1]}}))
    assert [r.settings["eval_k"] for r in read_grid(path, overrides(None, None))] == [5, 5]
    assert [r.settings["eval_k"] for r in read_grid(path, overrides(2, 3))] == [3, 3]
    assert overrides(2, 3) == {"threads": 2, "eval_k": 3}
