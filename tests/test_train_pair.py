"""A user's own model/guide pair trains through `pyro_vae.train` from Python with no adapter: Pyro's
example VAE (retyped below: sites 'latent' and 'obs', pyro.module) on the 8x8 digits. Its parameters
move, the run directory is written (the pair recorded, its parameters checkpointed by their names in
Pyro's param store), a resume continues exactly where the run stopped (into the same pair or into a
fresh one), the KL weight scales its latent site although it is not named 'z', and the command line,
which cannot rebuild the pair, refuses its run in one line."""

import json
import shutil

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn
from torch.distributions import kl_divergence

import pyro_vae
from pyro_vae.cli import main
from pyro_vae.config import Config
from pyro_vae.data import binarize
from pyro_vae.errors import InputError
from pyro_vae.evaluation.evaluate import per_example
from pyro_vae.models.kind import MODEL_SETTINGS
from pyro_vae.training.run_dir import load_pair
from pyro_vae.training.train import prepare_data, train

from .conftest import assert_log_px_at_least_elbo

D, Z, HIDDEN = 64, 4, 32  # 8x8 digits


class Encoder(nn.Module):
    def __init__(self, z_dim, hidden_dim, d=784):
        super().__init__()
        self.d = d
        self.fc1, self.fc21, self.fc22 = nn.Linear(d, hidden_dim), nn.Linear(hidden_dim, z_dim), \
            nn.Linear(hidden_dim, z_dim)

    def forward(self, x):
        h = nn.functional.softplus(self.fc1(x.reshape(-1, self.d)))
        return self.fc21(h), torch.exp(self.fc22(h))


class Decoder(nn.Module):
    def __init__(self, z_dim, hidden_dim, d=784):
        super().__init__()
        self.fc1, self.fc21 = nn.Linear(z_dim, hidden_dim), nn.Linear(hidden_dim, d)

    def forward(self, z):
        return (torch.sigmoid(self.fc21(nn.functional.softplus(self.fc1(z)))) + 1e-7) * (1 - 2e-7)


class ExampleVAE(nn.Module):
    """Pyro's examples/vae/vae.py, as a Pyro user writes it."""

    def __init__(self, z_dim=50, hidden_dim=400, d=784):
        super().__init__()
        self.z_dim, self.d = z_dim, d
        self.encoder, self.decoder = Encoder(z_dim, hidden_dim, d), Decoder(z_dim, hidden_dim, d)

    def model(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            loc = x.new_zeros(x.shape[0], self.z_dim)
            z = pyro.sample("latent", dist.Normal(loc, torch.ones_like(loc)).to_event(1))
            pyro.sample("obs", dist.Bernoulli(self.decoder(z)).to_event(1), obs=x.reshape(-1, self.d))

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            loc, scale = self.encoder(x)
            pyro.sample("latent", dist.Normal(loc, scale).to_event(1))


def _pair(seed: int = 0) -> ExampleVAE:
    """A fresh pair, as a new session builds it: an empty param store, then the networks."""
    pyro.clear_param_store()
    torch.manual_seed(seed)
    return ExampleVAE(Z, HIDDEN, D)


def _config(**changes) -> Config:
    return Config(**{"train_size": 256, "test_size": 64, "batch_size": 64, "epochs": 2, "eval_k": 5,
                     "device": "cpu", **changes})


def _values(pair: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in pair.named_parameters()}


def _rows(run) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]  # wall time differs


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The example pair trained 2 epochs from Python: (pair, its values before, the run directory)."""
    pair = _pair()
    before = _values(pair)
    out = tmp_path_factory.mktemp("pair") / "run"
    train(_config(), out, progress=False, program=pair)
    return pair, before, out


def test_every_parameter_of_the_pair_moves(trained):
    pair, before, _ = trained
    for name, value in pair.named_parameters():
        assert not torch.equal(value, before[name]), name


def test_the_run_directory_records_the_pair_and_its_parameters_by_param_store_name(trained):
    pair, _, out = trained
    recorded = json.loads((out / "config.json").read_text())
    assert recorded["pair"] == {"name": f"{__name__}.ExampleVAE", "latent_sites": ["latent"],
                                "observed_site": "obs"}
    assert recorded["x_shape"] == [1, 8, 8] and recorded["epochs"] == 2
    assert not set(MODEL_SETTINGS) & set(recorded)  # our VAE's settings do not describe the pair
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    names = {f"{part}$$${name}": p for part in ("encoder", "decoder")
             for name, p in getattr(pair, part).named_parameters()}
    assert set(state["model"]) == set(names)
    for name, p in names.items():
        assert torch.equal(state["model"][name], p.detach()), name
    assert state["epoch"] == 3 and state["batch"] == 0 and state["step"] == 8  # 256 / 64 = 4 steps an epoch


def test_metrics_and_summary_are_in_nats_per_example(trained):
    pair, _, out = trained
    rows = _rows(out)
    assert [(r["epoch"], r["step"]) for r in rows] == [(1, 4), (2, 8)]
    assert all(r["test_elbo"] < 0 < r["train_loss"] for r in rows)
    assert rows[1]["train_loss"] < rows[0]["train_loss"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["steps"] == 8 and summary["n_examples"] == 64
    assert summary["test_elbo"] == pytest.approx(summary["recon"] - summary["kl"], abs=1e-3)
    pyro.set_rng_seed(0)
    assert_log_px_at_least_elbo(per_example(pair, prepare_data(_config()).test_x, eval_k=_config().eval_k))
    for figure in ("samples.png", "reconstructions.png", "traversal.png", "latent_map.png", "curves.png"):
        assert (out / figure).is_file(), figure


def test_resume_continues_the_checkpoint_exactly_into_the_same_or_a_fresh_pair(tmp_path):
    """2 epochs, then resume to 3: the metrics of epochs 1-2 stay, epoch 3 is appended, and the run
    equals one of 3 epochs that never stopped (bit for bit on CPU), whether the pair trained before
    is passed again or a new session builds a fresh one (other initial values, restored in place)."""
    again, fresh = tmp_path / "again", tmp_path / "fresh"
    pair = _pair()
    train(_config(), again, progress=False, program=pair)
    shutil.copytree(again, fresh)
    rows = _rows(again)
    train(_config(epochs=3), again, resume=True, progress=False, program=pair)
    resumed_pair = _pair(seed=1)
    train(_config(epochs=3), fresh, resume=True, progress=False, program=resumed_pair)
    straight_pair = _pair()
    train(_config(epochs=3), tmp_path / "straight", progress=False, program=straight_pair)
    for run in (again, fresh):
        assert _rows(run)[:2] == rows and _rows(run) == _rows(tmp_path / "straight")
    for p, q, r in zip(pair.parameters(), resumed_pair.parameters(), straight_pair.parameters(), strict=True):
        assert torch.equal(p, r) and torch.equal(q, r)


def test_load_pair_restores_a_trained_pair_into_a_fresh_one(trained):
    pair, _, out = trained
    fresh = _pair(seed=1)
    load_pair(out, fresh)
    for p, q in zip(pair.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q)


def test_beta_scales_the_kl_of_a_latent_site_not_named_z(tmp_path):
    """One step on one batch of all 64 training examples, from the same initial values and the same
    draw of z: its loss is -E_q log p(x|z) + beta * KL(q || p) (analytic KL), so the losses at beta = 1
    and 0.5 differ by half the KL, which is computed here from the pair's encoder at the initial values."""
    settings = {"train_size": 64, "epochs": 1, "estimator": "analytic"}
    losses = {}
    for beta in (1.0, 0.5):
        pair = _pair()
        if beta == 1.0:  # the batch the step sees: the training set binarized by the run's first draw
            config = _config(**settings)
            x = binarize(prepare_data(config).train_x, torch.Generator().manual_seed(config.seed))
            with torch.no_grad():
                loc, scale = pair.encoder(x)
            kl = kl_divergence(dist.Normal(loc, scale), dist.Normal(0.0, 1.0)).sum(-1).mean()
        run = train(_config(**settings, beta=beta), tmp_path / str(beta), progress=False, program=pair)
        losses[beta] = run.metrics[0]["train_loss"]
    assert kl > 0.1  # large against float32 rounding of the losses (~1e-5 nats)
    assert losses[1.0] - losses[0.5] == pytest.approx(0.5 * float(kl), rel=1e-4)


def test_the_command_line_refuses_a_pair_run_in_one_line(trained, capsys):
    _, _, out = trained
    for argv in (["evaluate", str(out)], ["sample", str(out)], ["train", "--resume", str(out), "--quiet"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "your own model/guide pair" in err and "Python API" in err, err


def test_report_on_a_pair_run_names_the_python_call_that_evaluates_it_and_that_call_works(
        trained, tmp_path, capsys, digits_run):
    """`pyro-vae evaluate` refuses a pair's run, so for a run without its evaluation (training writes it
    at its end; here removed, as from a run stopped before its end) report's hint is the Python call;
    made as the hint says (with a fresh pair built the same way), it writes what report reads, and
    report then runs."""
    pair, _, trained_out = trained
    out = shutil.copytree(trained_out, tmp_path / "run")
    for name in ("eval.json", "eval_examples.pt"):
        (out / name).unlink()
    assert main(["report", str(out), "--out", str(tmp_path / "report")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pyro-vae evaluate" not in err, err
    hint = f"pyro_vae.evaluate_run({str(out)!r}, program=<the same pair>)"
    assert hint in err, err
    result, _, evaluated = pyro_vae.evaluate_run(str(out), eval_k=5, program=_pair(seed=1))
    for p, q in zip(pair.parameters(), evaluated.parameters(), strict=True):
        assert torch.equal(p, q)  # the run's parameters, not the fresh pair's
    assert main(["report", str(out), "--out", str(tmp_path / "report")]) == 0
    table = json.loads((tmp_path / "report" / "report.json").read_text())["runs"]
    assert table[0]["log_px"] == result["log_px"] and table[0]["n_examples"] == 64
    with pytest.raises(InputError, match="not a pair of yours"):  # and a pair for pyro-vae's VAE's run
        pyro_vae.evaluate_run(digits_run, eval_k=5, program=_pair())
    assert main(["evaluate", str(out)]) == 2 and hint in capsys.readouterr().err  # evaluate's hint too


def test_resuming_with_the_other_kind_of_model_is_refused(trained, digits_run):
    pair, _, out = trained
    with pytest.raises(InputError, match="pass the same pair again"):
        train(_config(), out, resume=True, progress=False)
    with pytest.raises(InputError, match="trained pyro-vae's own VAE"):
        train(_config(), digits_run, resume=True, progress=False, program=pair)


@pytest.mark.parametrize("setting", [{"z_dim": 3}, {"hidden": [64]}, {"prior": "mog"}])
def test_settings_that_build_pyro_vaes_own_vae_are_refused_with_a_pair(tmp_path, setting):
    with pytest.raises(InputError, match=f"{next(iter(setting))} build pyro-vae's own VAE"):
        train(_config(**setting), tmp_path / "run", progress=False, program=_pair())
    assert not (tmp_path / "run").exists()
