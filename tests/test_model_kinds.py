"""Model kinds own their behaviour (pyro_vae/models/): no module outside the kinds branches on the kind;
a kind registers from Python or from a --plugin module, and a kind of a test's own (a VAE with two latent
sites, tests/plugins/two_site_kind.py) trains, evaluates, samples, compares and reports from the command
line; the caller's Config is never changed by training."""

import io
import json
import re
import tokenize
from pathlib import Path

import pytest
import torch

from pyro_vae import Config, InputError, train
from pyro_vae.cli import main
from pyro_vae.models import MODEL_KINDS, ModelKind, kind_of, model_kind, register_model
from pyro_vae.models.kind import PAIR, check_config
from pyro_vae.models.vae import VAEKind, build_vae

PACKAGE = Path(__file__).resolve().parents[1] / "pyro_vae"
# the ways code used to ask which kind it holds: a flag of the model, a list of kind names, a comparison
# of config.model with a name, a test for a method only some kinds have
BRANCHES = re.compile(r"\bis_autoencoder\b|\bis_classifier\b|LABELLED_MODELS|\bmodel\s*[!=]="
                      r"|\.\s*model\s+(not\s+)?in\b|['\"]predict['\"]|==\s*['\"](vae|ae|m2|classifier)['\"]")
PLUGIN = "tests.plugins.two_site_kind"
TINY = ["--dataset", "digits", "--train-size", "200", "--test-size", "60", "--hidden", "16", "--z-dim", "4",
        "--batch-size", "50", "--eval-k", "5", "--quiet"]


def code_without_text(path: Path) -> str:
    """The file's code with docstrings and comments dropped (a short string literal, e.g. "m2", kept)."""
    kept = []
    for token in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if token.type == tokenize.COMMENT:
            continue
        if token.type == tokenize.STRING and not re.fullmatch(r"['\"][\w.-]{0,20}['\"]", token.string):
            kept.append('""')
        else:
            kept.append(token.string)
    return " ".join(kept)


def kind_branches(root: Path = PACKAGE) -> dict[str, list[str]]:
    """Per module outside pyro_vae/models/ (and the two modules that only re-export from it), the code that
    branches on the model kind."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if relative.parts[0] == "models" or str(relative) in ("model.py", "m2.py"):
            continue
        hits = [m.group(0) for m in BRANCHES.finditer(code_without_text(path))]
        if hits:
            found[str(relative)] = hits
    return found


def test_no_module_outside_the_kinds_branches_on_the_kind():
    assert kind_branches() == {}


def test_the_scan_finds_a_branch_where_there_is_one(tmp_path):
    """The scan is not blind: the branches the package used to have are found (and text is not code)."""
    (tmp_path / "train.py").write_text('"""if config.model == "m2": in a docstring"""\n'
                                       'if config.model in LABELLED_MODELS and program.is_autoencoder:\n'
                                       '    x = 1  # is_classifier in a comment\n'
                                       'elif getattr(vae, "predict", None):\n    x = 2\n')
    expected = [". model in", "LABELLED_MODELS", "is_autoencoder", '"predict"']
    assert kind_branches(tmp_path) == {"train.py": expected}


class TinyKind(VAEKind):
    """The VAE under another name, refusing --beta: a kind registered from Python."""

    name = "tiny"

    def check(self, config) -> None:
        super().check(config)
        if config.beta != 1.0:
            raise InputError("--model tiny takes no --beta")


@pytest.fixture
def tiny():
    register_model("tiny", TinyKind())
    yield MODEL_KINDS["tiny"]
    MODEL_KINDS.unregister("tiny")


def test_a_kind_registered_from_python_checks_its_settings_and_trains(tiny, tmp_path):
    assert model_kind("tiny") is tiny and model_kind(tiny) is tiny
    with pytest.raises(InputError, match="--model tiny takes no --beta"):
        check_config(Config(model="tiny", beta=2.0))
    config = Config(model="tiny", train_size=100, test_size=30, hidden=[8], z_dim=2, epochs=1, eval_k=3)
    result = train(config, tmp_path / "run", progress=False)
    assert result.kind is tiny
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model"] == "tiny"
    assert set(result.summary) >= {"test_elbo", "log_px"}


def test_register_model_refuses_a_taken_name_and_what_is_not_a_kind(tiny):
    with pytest.raises(InputError, match="model name 'vae' is already taken \\(built in\\)"):
        register_model("vae", TinyKind())
    with pytest.raises(InputError, match="must be a pyro_vae.models.ModelKind"):
        register_model("not-a-kind", build_vae)
    with pytest.raises(InputError, match="unknown model 'gan': choose one of vae, ae, m2, classifier"):
        model_kind("gan")


def test_kind_of_a_built_model_and_of_a_pair():
    assert kind_of(build_vae((1, 4, 4), hidden=[4], z_dim=2)) is model_kind("vae")
    assert kind_of(build_vae((1, 4, 4), hidden=[4], z_dim=2, model="ae")) is model_kind("ae")
    assert kind_of((lambda x: None, lambda x: None)) is PAIR and isinstance(PAIR, ModelKind)


def test_training_leaves_the_callers_config_as_it_was(tmp_path):
    """The number of classes M2 reads off the data goes into config.json, not into the caller's Config
    (training used to write config.classes)."""
    config = Config(model="m2", labels=20, train_size=100, test_size=30, hidden=[8], z_dim=2, epochs=1,
                    eval_k=3)
    before = config.to_dict()
    train(config, tmp_path / "run", progress=False)
    assert config.to_dict() == before and config.classes is None
    assert json.loads((tmp_path / "run" / "config.json").read_text())["classes"] == 10


def test_m2s_temperature_is_the_kinds_schedule_passed_to_model_and_guide():
    """The relaxed M2's temperature is data the trainer asks the kind for (geometric from --temperature to
    --temperature-final), not a value written into the model."""
    m2 = model_kind("m2")
    config = Config(model="m2", labels=20, discrete="relaxed", temperature=2.0, temperature_final=0.5)
    assert m2.schedule(config, 0, 5) == {"temperature": 2.0}
    assert m2.schedule(config, 4, 5) == {"temperature": pytest.approx(0.5)}
    assert m2.schedule(Config(model="m2", labels=20), 3, 5) == {}
    assert model_kind("vae").schedule(config, 0, 5) == {}


def test_a_plugin_kind_trains_evaluates_samples_compares_and_reports_from_the_command_line(tmp_path, capsys):
    """tests/plugins/two_site_kind.py: a VAE whose latent has two sites, z1 and z2, with no change to the
    package; evaluate, sample, compare and report find the kind from the plugin recorded in config.json."""
    run = tmp_path / "two"
    plugin = ["--plugin", PLUGIN, "--model", "two-site"]
    assert main(["train", *plugin, "--epochs", "1", "--out", str(run), *TINY]) == 0
    recorded = json.loads((run / "config.json").read_text())
    assert recorded["model"] == "two-site" and recorded["plugins"] == [PLUGIN]
    assert {"test_elbo", "test_recon"} <= set(json.loads((run / "metrics.jsonl").read_text().splitlines()[0]))
    assert (run / "samples.png").is_file() and not (run / "traversal.png").exists()  # the kind's figures
    assert main(["evaluate", str(run), "--eval-k", "5", "--quiet"]) == 0
    assert "test ELBO" in capsys.readouterr().out
    assert json.loads((run / "eval.json").read_text())["log_px"] < 0
    assert main(["sample", str(run), "--n", "4"]) == 0
    assert main(["compare", str(run), "--estimators", "mc", "--particles", "1", "--repeats", "2",
                 "--eval-k", "5", "--quiet"]) == 0
    record = json.loads((run / "compare.json").read_text())
    assert record["estimators"][0]["estimator"] == "mc"
    assert main(["report", str(run), "--out", str(tmp_path / "report")]) == 0
    assert "two" in (tmp_path / "report" / "report.md").read_text()
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert any(name.startswith("encoder") for name in state["model"])


def test_a_plugin_kind_refuses_what_it_does_not_take_in_one_line(capsys):
    assert main(["train", "--plugin", PLUGIN, "--model", "two-site", "--prior", "mog", *TINY]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--model two-site has a N(0, I) prior on each site" in err
