"""Your own prior, likelihood or estimator: registered with one call (or named as MODULE:FACTORY),
then used by name from Python and from the CLI; a run records its plugins so that every later
command imports them again; every way a plugin can be wrong is one line and exit code 2."""

import importlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pyro.distributions as dist
import pytest
import torch
from pyro.infer import ELBO, Trace_ELBO
from torch import nn

import pyro_vae
from pyro_vae.cli import main
from pyro_vae.config import Config
from pyro_vae.errors import InputError
from pyro_vae.inference.estimators import make_estimator
from pyro_vae.models.kind import check_config
from pyro_vae.models.likelihoods import Bernoulli, make_likelihood
from pyro_vae.models.priors import PRIORS, make_prior
from pyro_vae.training.run_dir import load_model

from .conftest import unregister_all

TINY = ["--epochs", "1", "--hidden", "32", "--z-dim", "4", "--train-size", "200", "--test-size", "50",
        "--eval-k", "5"]

# A plugin module as a user writes it: a Laplace prior, a Bernoulli under another name and a
# Trace_ELBO subclass, each counting how often it is built (so a test can see it was used).
PLUGIN = '''
import pyro.distributions as dist
import torch
from pyro.infer import Trace_ELBO
from torch import nn

import pyro_vae
from pyro_vae.models.likelihoods import Bernoulli

BUILT = {"prior": 0, "likelihood": 0, "estimator": 0}
NOT_CALLABLE = 3


class LaplacePrior(nn.Module):
    def __init__(self, z_dim):
        super().__init__()
        self.register_buffer("loc", torch.zeros(z_dim))

    def forward(self):
        return dist.Laplace(self.loc, 1.0).to_event(1)


def make_prior(z_dim, **options):
    BUILT["prior"] += 1
    return LaplacePrior(z_dim)


class CountedBernoulli(Bernoulli):
    name = "counted-bernoulli"


def make_likelihood(**options):
    BUILT["likelihood"] += 1
    return CountedBernoulli()


class CountedELBO(Trace_ELBO):
    def __init__(self, **options):
        BUILT["estimator"] += 1
        super().__init__(**options)


if REGISTER:
    pyro_vae.register_prior("laplace", make_prior)
    pyro_vae.register_likelihood("counted-bernoulli", make_likelihood)
    pyro_vae.register_estimator("counted-mc", CountedELBO)
'''


def write_plugin(folder: Path, name: str, register: bool = True) -> None:
    (folder / f"{name}.py").write_text(f"REGISTER = {register}\n" + PLUGIN)
    importlib.invalidate_caches()


def forget_plugins() -> None:
    """What a fresh process has: the built-in entries only, and no plugin module imported."""
    unregister_all()
    for name in [m for m in sys.modules if m.startswith("plugin_")]:
        del sys.modules[name]


@pytest.fixture(autouse=True)
def plugin_path(tmp_path, monkeypatch):
    """A folder on sys.path for this test's plugin modules; the registries hold the built-in entries
    only, before and after, so that no test sees another's entries."""
    forget_plugins()
    folder = tmp_path / "plugins"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    yield folder
    forget_plugins()


def built(module: str) -> dict:
    return sys.modules[module].BUILT


# ---- Python ----

class WideNormal(nn.Module):
    """p(z) = N(0, 2^2 I)."""

    def __init__(self, z_dim: int):
        super().__init__()
        self.register_buffer("loc", torch.zeros(z_dim))

    def forward(self):
        return dist.Normal(self.loc, 2.0).to_event(1)


class WideELBO(Trace_ELBO):
    pass


class WideBernoulli(Bernoulli):
    name = "wide-bernoulli"


def test_registered_entries_train_a_run_by_name_from_python(tmp_path):
    pyro_vae.register_prior("wide", lambda z_dim, **_: WideNormal(z_dim))
    pyro_vae.register_likelihood("wide-bernoulli", lambda **_: WideBernoulli())
    pyro_vae.register_estimator("wide-mc", WideELBO)
    config = Config(prior="wide", likelihood="wide-bernoulli", estimator="wide-mc", epochs=1, hidden=[32],
                    z_dim=4, train_size=200, test_size=50, eval_k=5)
    assert check_config(config).binarize == "dynamic"  # the registered likelihood is discrete
    result = pyro_vae.train(config, out=tmp_path / "run", progress=False)
    assert result.summary["test_elbo"] < 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["binarize"] == "dynamic"
    _, vae = load_model(result.out)
    assert isinstance(vae.prior, WideNormal) and isinstance(vae.likelihood, WideBernoulli)
    assert isinstance(make_estimator("wide-mc", 3), WideELBO)
    assert make_estimator("wide-mc", 3).num_particles == 3


def test_a_taken_name_is_refused_and_the_same_definition_may_be_registered_again():
    def make(z_dim, **_):
        return WideNormal(z_dim)

    with pytest.raises(InputError, match="prior name 'normal' is already taken \\(built in\\)"):
        pyro_vae.register_prior("normal", make)
    assert pyro_vae.register_prior("wide", make) is make
    pyro_vae.register_prior("wide", make)

    def make_again(z_dim, **_):  # a re-run notebook cell: same module and name, a new object
        return WideNormal(z_dim)

    make_again.__qualname__ = make.__qualname__
    pyro_vae.register_prior("wide", make_again)
    assert PRIORS["wide"] is make_again
    with pytest.raises(InputError, match="already taken \\(by tests.test_plugins.test_a_taken_name"):
        pyro_vae.register_prior("wide", WideNormal)


@pytest.mark.parametrize("register, bad, message", [
    (pyro_vae.register_prior, 3, "is not callable"),
    (pyro_vae.register_likelihood, "gaussian", "is not callable"),
    (pyro_vae.register_estimator, None, "is not callable"),
])
def test_a_factory_that_is_not_callable_is_refused(register, bad, message):
    with pytest.raises(InputError, match=message):
        register("mine", bad)


@pytest.mark.parametrize("name", ["", "a:b", 7])
def test_a_name_must_be_a_string_without_a_colon(name):
    with pytest.raises(InputError, match="non-empty string without ':'"):
        pyro_vae.register_prior(name, WideNormal)


def test_a_factory_that_does_not_follow_the_contract_is_an_input_error():
    pyro_vae.register_prior("no-options", lambda z_dim: WideNormal(z_dim))
    with pytest.raises(InputError, match="cannot take the options .* with \\*\\*options"):
        make_prior("no-options", 4, encoder=None, x_shape=(1, 8, 8))
    pyro_vae.register_likelihood("not-a-likelihood", lambda **_: nn.Identity())
    with pytest.raises(InputError, match="returned a value of type Identity, not an instance of Likelihood"):
        make_likelihood("not-a-likelihood")
    pyro_vae.register_estimator("not-an-elbo", lambda **_: object())
    with pytest.raises(InputError, match="returned a value of type object, not an instance of ELBO"):
        make_estimator("not-an-elbo")


def test_module_colon_factory_is_imported_and_used_without_registering(plugin_path):
    write_plugin(plugin_path, "plugin_direct", register=False)
    prior = make_prior("plugin_direct:make_prior", 4)
    assert type(prior).__name__ == "LaplacePrior"
    assert isinstance(make_estimator("plugin_direct:CountedELBO"), ELBO)
    assert built("plugin_direct") == {"prior": 1, "likelihood": 0, "estimator": 1}
    assert set(PRIORS) == PRIORS.builtins  # nothing was registered: the name says where the factory is


def test_the_unknown_name_error_says_how_to_add_one():
    with pytest.raises(InputError, match="unknown prior 'wide': choose one of normal, .*register_prior"):
        make_prior("wide", 4)


# ---- the command line ----

def train_argv(out: Path, *flags: str) -> list[str]:
    return ["train", *flags, *TINY, "--out", str(out), "--quiet"]


def test_plugin_flag_trains_a_run_that_records_and_reimports_the_plugin(plugin_path, tmp_path, capsys):
    write_plugin(plugin_path, "plugin_cli")
    run = tmp_path / "run"
    argv = train_argv(run, "--plugin", "plugin_cli", "--prior", "laplace",
                      "--likelihood", "counted-bernoulli", "--estimator", "counted-mc")
    assert main(argv) == 0
    assert all(built("plugin_cli").values())
    recorded = json.loads((run / "config.json").read_text())
    assert recorded["plugins"] == ["plugin_cli"] and recorded["binarize"] == "dynamic"

    forget_plugins()  # as in a new process: evaluate must import the plugin by itself
    assert main(["evaluate", str(run), "--eval-k", "5", "--quiet"]) == 0
    assert built("plugin_cli")["prior"] >= 1 and built("plugin_cli")["likelihood"] >= 1
    forget_plugins()
    with pytest.warns(UserWarning, match="training continues"):
        assert main(["train", "--resume", str(run), "--epochs", "2", "--quiet"]) == 0
    assert built("plugin_cli")["estimator"] >= 1
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert json.loads((run / "config.json").read_text())["plugins"] == ["plugin_cli"]
    capsys.readouterr()


def test_module_colon_factory_from_the_cli_needs_no_registration(plugin_path, tmp_path):
    write_plugin(plugin_path, "plugin_direct_cli", register=False)
    run = tmp_path / "run"
    assert main(train_argv(run, "--prior", "plugin_direct_cli:make_prior", "--estimator",
                           "plugin_direct_cli:CountedELBO")) == 0
    recorded = json.loads((run / "config.json").read_text())
    assert recorded["prior"] == "plugin_direct_cli:make_prior" and recorded["plugins"] == []
    forget_plugins()
    config, vae = load_model(run)
    assert type(vae.prior).__name__ == "LaplacePrior"


@pytest.mark.parametrize("command", [
    ["sample", "--n", "4"],
    ["compare", "--estimators", "mc:1", "--repeats", "2", "--batch-size", "4", "--eval-k", "10", "--quiet"],
    ["diagnose", "--n-examples", "2", "--mcmc-examples", "0", "--eval-k", "10", "--svi-steps", "2",
     "--quiet"],
])
def test_every_command_that_rebuilds_the_model_imports_the_plugin(plugin_path, tmp_path, command, capsys):
    write_plugin(plugin_path, "plugin_every")
    run = tmp_path / "run"
    assert main(train_argv(run, "--plugin", "plugin_every", "--prior", "laplace")) == 0
    forget_plugins()
    assert main([command[0], str(run), *command[1:]]) == 0, capsys.readouterr().err
    assert built("plugin_every")["prior"] >= 1


def test_a_run_trained_with_an_unrecorded_plugin_takes_it_as_a_flag(plugin_path, tmp_path, capsys):
    write_plugin(plugin_path, "plugin_script")
    importlib.import_module("plugin_script")  # a script imports it, and Config does not name it
    run = pyro_vae.train(Config(prior="laplace", epochs=1, hidden=[32], z_dim=4, train_size=200,
                                test_size=50, eval_k=5), out=tmp_path / "run", progress=False).out
    forget_plugins()
    assert main(["evaluate", str(run), "--eval-k", "5", "--quiet"]) == 2
    assert "unknown prior 'laplace'" in capsys.readouterr().err
    assert main(["evaluate", str(run), "--eval-k", "5", "--quiet", "--plugin", "plugin_script"]) == 0
    forget_plugins()
    with pytest.warns(UserWarning, match="training continues"):
        assert main(["train", "--resume", str(run), "--epochs", "2", "--plugin", "plugin_script",
                     "--quiet"]) == 0


def test_a_fresh_process_evaluates_a_plugin_run_from_pythonpath(plugin_path, tmp_path):
    write_plugin(plugin_path, "plugin_fresh")
    run = tmp_path / "run"
    assert main(train_argv(run, "--plugin", "plugin_fresh", "--prior", "laplace")) == 0
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin_path), str(root)]),
           "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run([sys.executable, "-m", "pyro_vae", "evaluate", str(run), "--eval-k", "5",
                           "--quiet"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "log p(x), k=5" in done.stdout


BROKEN = {
    "plugin_clash": "import pyro_vae\npyro_vae.register_prior('normal', lambda **_: None)\n",
    "plugin_raises": "raise RuntimeError('the plugin is broken')\n",
    "plugin_needs": "import plugin_dependency_not_installed\n",
}


@pytest.mark.parametrize("flags, expected", [
    (["--plugin", "plugin_clash"], "plugin module 'plugin_clash': prior name 'normal' is already taken"),
    (["--plugin", "plugin_raises"], "'plugin_raises' failed to import: RuntimeError: the plugin is broken"),
    (["--plugin", "plugin_needs"], "No module named 'plugin_dependency_not_installed'"),
    (["--plugin", "plugin_missing"], "cannot import plugin module 'plugin_missing'"),
    (["--prior", "plugin_missing:make_prior"], "cannot import plugin module 'plugin_missing'"),
    (["--prior", "plugin_ok:make_vampire"], "plugin module 'plugin_ok' has no attribute 'make_vampire'"),
    (["--likelihood", "plugin_ok:NOT_CALLABLE"], "is not callable"),
    (["--estimator", "plugin_ok:make_prior"], "cannot take the options"),
    (["--prior", "plugin_ok"], "unknown prior 'plugin_ok'"),
])
def test_a_bad_plugin_is_one_line_and_exit_code_2(plugin_path, tmp_path, capsys, flags, expected):
    for name, text in BROKEN.items():
        (plugin_path / f"{name}.py").write_text(text)
    write_plugin(plugin_path, "plugin_ok", register=False)
    out = tmp_path / "run"
    assert main(train_argv(out, *flags)) == 2
    err = capsys.readouterr().err
    assert err.startswith("pyro-vae: error: ") and err.count("\n") == 1, err
    assert expected in err and "Traceback" not in err
    assert not out.exists()


def test_a_run_whose_plugin_is_gone_is_an_input_error(plugin_path, tmp_path, capsys):
    write_plugin(plugin_path, "plugin_gone")
    run = tmp_path / "run"
    assert main(train_argv(run, "--plugin", "plugin_gone", "--prior", "laplace")) == 0
    forget_plugins()
    (plugin_path / "plugin_gone.py").unlink()
    capsys.readouterr()
    assert main(["evaluate", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "cannot import plugin module 'plugin_gone'" in err and err.count("\n") == 1


def test_plugins_in_a_config_file_are_imported(plugin_path, tmp_path):
    write_plugin(plugin_path, "plugin_yaml")
    (tmp_path / "config.yaml").write_text(textwrap.dedent("""\
        plugins: [plugin_yaml]
        prior: laplace
    """))
    run = tmp_path / "run"
    assert main(train_argv(run, "--config", str(tmp_path / "config.yaml"))) == 0
    assert json.loads((run / "config.json").read_text())["plugins"] == ["plugin_yaml"]


def test_constructing_a_config_records_its_plugins_and_imports_none(plugin_path):
    write_plugin(plugin_path, "plugin_recorded")
    config = Config(plugins=["plugin_recorded"])
    assert config.plugins == ["plugin_recorded"] and "plugin_recorded" not in sys.modules
    assert "laplace" not in PRIORS  # nothing it would register is there either
    config = Config.from_dict({"plugins": ["plugin_recorded"], "prior": "laplace"})  # the edge imports it
    assert "plugin_recorded" in sys.modules and config.prior == "laplace"
