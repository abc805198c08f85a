"""`pyro-vae compare`: what it writes, that it is reproducible, and that bad input is refused."""

import json
import math
import shutil
import sys

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from pyro_vae import build_vae, register_estimator
from pyro_vae.cli import main
from pyro_vae.evaluation.compare import BATCH_ONLY, VAE_GROUPS, compare, markdown, write_comparison
from pyro_vae.evaluation.compare_measures import parameter_groups
from pyro_vae.inference.estimators import make_estimator

from .conftest import unregister_all
from .test_estimators import X0, XS, Tiny, TwoLatents

SMALL = ["--repeats", "4", "--batch-size", "16", "--eval-k", "50", "--quiet"]


@pytest.fixture(scope="module")
def compared(digits_run, tmp_path_factory):
    """A copy of the session's digits run, compared with every estimator at K = 1 and 4."""
    run = tmp_path_factory.mktemp("compare") / "run"
    shutil.copytree(digits_run, run)
    assert main(["compare", str(run), "--particles", "1", "4", *SMALL]) == 0
    return run, json.loads((run / "compare.json").read_text())


def test_compare_writes_json_markdown_and_figures_into_the_run(compared):
    run, record = compared
    for name in ("compare.json", "compare.md", "compare_snr.png", "compare_estimates.png"):
        assert (run / name).stat().st_size > 0
    specs = [(row["estimator"], row["particles"]) for row in record["estimators"]]
    assert specs == [(name, k) for name in ("mc", "analytic", "iwae", "stl", "iwae-dreg") for k in (1, 4)]
    for row in record["estimators"]:
        numbers = [row["value_mean"], row["value_std"], row["bias"], row["ms_per_step"],
                   *(row[g][m] for g in ("encoder", "decoder") for m in ("grad_var", "snr"))]
        assert all(math.isfinite(v) for v in numbers), row
        assert row["value_mean"] < 0 and row["value_std"] > 0 and len(row["batch_means"]) == 4
    assert record["n_examples"] == 16 and record["k_ref"] == 50
    assert record["analytic_kl"] == {"analytic_kl_sites": ["z"], "monte_carlo_kl_sites": []}
    table = (run / "compare.md").read_text()
    assert "| estimator | K | bound (nats) |" in table
    assert sum(line.startswith("| iwae-dreg | ") for line in table.splitlines()) == 2


def test_iwae_and_dreg_share_values_and_decoder_gradients_but_not_encoder_gradients(compared):
    """Same seed, same draws: DReG changes only the encoder's gradient; at K=1 IWAE is the ELBO."""
    _, record = compared
    rows = {(r["estimator"], r["particles"]): r for r in record["estimators"]}
    iwae, dreg = rows["iwae", 4], rows["iwae-dreg", 4]
    assert dreg["batch_means"] == iwae["batch_means"]
    assert dreg["decoder"]["grad_var"] == pytest.approx(iwae["decoder"]["grad_var"], rel=1e-4)
    assert dreg["encoder"]["grad_var"] != pytest.approx(iwae["encoder"]["grad_var"], rel=1e-2)
    assert rows["iwae", 1]["batch_means"] == pytest.approx(rows["mc", 1]["batch_means"], rel=1e-6)


def test_compare_is_reproducible_and_a_row_does_not_depend_on_the_others(compared, tmp_path):
    run, record = compared
    argv = ["compare", str(run), "--estimators", "stl:4", "iwae-dreg:4", "--out", str(tmp_path), *SMALL]
    assert main(argv) == 0
    again = json.loads((tmp_path / "compare.json").read_text())
    before = {(r["estimator"], r["particles"]): r for r in record["estimators"]}
    assert again["log_px_ref"] == record["log_px_ref"]
    for row in again["estimators"]:
        old = before[row["estimator"], row["particles"]]
        for key in ("value_mean", "value_std", "bias", "batch_means", "encoder", "decoder"):
            assert row[key] == old[key], key


def test_compare_on_a_config_trains_each_estimator_and_reports_its_final_log_px(tmp_path):
    config = tmp_path / "small.yaml"
    config.write_text("train_size: 100\ntest_size: 20\nhidden: [32]\nz_dim: 4\nbatch_size: 50\neval_k: 2\n")
    out = tmp_path / "out"
    argv = ["compare", "--config", str(config), "--out", str(out), "--estimators", "mc", "iwae:2",
            "--train-epochs", "1", "--repeats", "3", "--batch-size", "8", "--eval-k", "10", "--quiet"]
    assert main(argv) == 0
    record = json.loads((out / "compare.json").read_text())
    assert "untrained" in record["model"]
    for row in record["estimators"]:
        final = row["final"]
        assert final["epochs"] == 1 and math.isfinite(final["log_px"])
        assert (out / "compare-train" / f"{row['estimator']}-K{row['particles']}" / "checkpoint.pt").is_file()
    assert "log p(x) after 1 epochs (nats)" in (out / "compare.md").read_text()


BAD = [
    (["--estimators", "magic"], "unknown estimator 'magic' in --estimators"),
    (["--estimators", "iwae:0"], "the number of particles after ':' must be a positive integer"),
    (["--estimators", "iwae:x"], "the number of particles after ':' must be a positive integer"),
    (["--repeats", "1"], "--repeats must be at least 2"),
    (["--eval-k", "0"], "--eval-k must be a positive integer"),
    (["--particles", "0"], "--particles needs positive integers"),
    (["--pretrain-epochs", "2"], "--pretrain-epochs applies to --config"),
    (["--config", "CONFIG"], "either a run directory or --config FILE (not both)"),
    (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    (["--temperature", "0.5"], "a VAE has no discrete latent"),
]


@pytest.mark.parametrize("flags, expected", BAD, ids=[b[1] for b in BAD])
def test_bad_input_is_one_line_and_exit_2_and_writes_nothing(flags, expected, digits_run, tmp_path, capsys):
    out = tmp_path / "out"
    flags = [str(tmp_path / "c.yaml") if f == "CONFIG" else f for f in flags]
    (tmp_path / "c.yaml").write_text("epochs: 1\n")
    assert main(["compare", str(digits_run), "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pyro-vae: error: ") and err.count("\n") == 1 and expected in err, err
    assert not out.exists()


@pytest.mark.parametrize("argv, expected", [
    (["compare"], "either a run directory or --config FILE"),
    (["compare", "--config", "c.yaml"], "compare --config needs --out DIR"),
    (["compare", "no-such-run"], "is not a pyro-vae run directory"),
])
def test_compare_needs_one_model_source(argv, expected, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text("epochs: 1\n")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err, err


def test_parameter_groups_are_the_guides_parameters_and_the_models_others():
    """'encoder': what the guide uses; 'decoder': the rest of what the model uses (decoder, learned
    scale, VampPrior pseudo-inputs), although the VampPrior runs the encoder inside the model too."""
    vae = build_vae((1, 4, 4), hidden=[8], z_dim=3, prior="vamp", prior_components=3,
                    likelihood="gaussian-learned")
    groups = parameter_groups(vae, torch.rand(5, 1, 4, 4))
    encoder = {id(p) for p in vae.encoder.parameters()}
    assert {id(p) for p in groups["encoder"]} == encoder
    assert {id(p) for p in groups["decoder"]} == {id(p) for p in vae.parameters()} - encoder
    assert len(groups["encoder"]) + len(groups["decoder"]) == len(list(vae.parameters()))


# ---- each estimator answers for its own value; a registered one is measured, or skipped with a note ----


def _direct_bound(name, tiny, x, k):
    """One draw of each example's bound on Tiny's pair, from the guide's draws z (K, N, 1) and its
    densities in closed form: the ELBO mean_k log w_k (mc, stl), IWAE_K (iwae, iwae-dreg), or
    mean_k log p(x|z_k) - KL(N(loc, s) || N(0, 1)) (analytic)."""
    with pyro.plate("particles", k, dim=-2):
        z = poutine.trace(tiny.guide).get_trace(x).nodes["z"]["value"]
    loc, scale = (x * tiny.c).sum(-1, keepdim=True) + tiny.d, tiny.s.exp()
    log_lik = dist.Normal(z * tiny.a + tiny.b, 1.0).log_prob(x).sum(-1)
    log_w = dist.Normal(0.0, 1.0).log_prob(z).sum(-1) + log_lik - dist.Normal(loc, scale).log_prob(z).sum(-1)
    if name in ("mc", "stl"):
        return log_w.mean(0)
    if name in ("iwae", "iwae-dreg"):
        return log_w.logsumexp(0) - math.log(k)
    kl = (0.5 * (scale**2 + loc**2 - 1) - scale.log()).sum(-1)
    return log_lik.mean(0) - kl


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("name", ["mc", "analytic", "iwae", "stl", "iwae-dreg"])
def test_each_builtin_estimators_per_example_bound_is_its_direct_computation(name, k):
    """What compare measures for a built-in estimator: its per_example_bound, the same draw as the
    closed-form computation from the same seed."""
    tiny, x = Tiny(), X0.repeat(3, 1)
    for seed in range(2):
        pyro.set_rng_seed(seed)
        with torch.no_grad():
            value = make_estimator(name, k).per_example_bound(tiny.model, tiny.guide, x)
        pyro.set_rng_seed(seed)
        torch.testing.assert_close(value, _direct_bound(name, tiny, x, k).detach())


class PlainELBO(pyro.infer.Trace_ELBO):
    """A user's estimator: Pyro's Trace_ELBO as it is, with no per_example_bound."""


def _renyi(**options):
    return pyro.infer.RenyiELBO(alpha=0.0, **options)


def test_compare_measures_a_registered_elbo_through_its_own_loss():
    """At K = 1 and the same seed, Trace_ELBO (differentiable_loss) and RenyiELBO(alpha=0) (no
    differentiable_loss: loss_and_grads, its gradient divided by N) draw the same z as `mc` and
    estimate the same ELBO: the same batch means and gradient variances, with no per-example std."""
    torch.manual_seed(0)
    vae = build_vae((1, 4, 4), hidden=[8], z_dim=2)
    x = (torch.rand(12, 1, 4, 4) > 0.5).float()
    register_estimator("plain-mc", PlainELBO)
    register_estimator("renyi", _renyi)
    try:
        record = compare(vae, x, particles=[1], repeats=5, eval_k=20)
    finally:
        unregister_all()
    rows = {row["estimator"]: row for row in record["estimators"]}
    assert list(rows) == ["mc", "analytic", "iwae", "stl", "iwae-dreg", "plain-mc", "renyi"]
    mc = rows["mc"]
    assert mc["value_std"] > 0 and "note" not in mc
    for name in ("plain-mc", "renyi"):
        row = rows[name]
        assert row["value_std"] is None and row["note"] == BATCH_ONLY
        assert row["batch_means"] == pytest.approx(mc["batch_means"], rel=1e-5)
        assert row["value_mean_se"] == pytest.approx(mc["value_mean_se"], rel=1e-3)
        for group in ("encoder", "decoder"):
            assert row[group]["grad_var"] == pytest.approx(mc[group]["grad_var"], rel=1e-3)
    table = markdown(record)
    assert f"- `renyi` K=1 {BATCH_ONLY}" in table.splitlines()
    assert "| renyi | 1 |" in table and "| —" in table


def test_an_estimator_that_refuses_the_pair_is_skipped_with_a_one_line_note(tmp_path):
    """IWAE refuses a guide whose latent site has no rsample; compare measures mc on it (Trace_ELBO's
    score-function gradient) and says in one line why IWAE was not measured."""
    module = TwoLatents(discrete=True)
    record = compare(module, XS, estimators=["mc:2", "iwae:2"], repeats=3, eval_k=10)
    mc_row, iwae_row = record["estimators"]
    assert set(iwae_row) == {"estimator", "particles", "skipped"}
    assert "latent site of the guide reparameterized (rsample); site 'a' is not" in iwae_row["skipped"]
    assert "skipped" not in mc_row and math.isfinite(mc_row["value_mean"]) and mc_row["value_std"] > 0
    write_comparison(record, tmp_path)
    notes = [line for line in (tmp_path / "compare.md").read_text().splitlines() if line.startswith("- ")]
    assert notes == [f"- `iwae` K=2 not measured: {iwae_row['skipped']}"]
    assert json.loads((tmp_path / "compare.json").read_text())["estimators"][1] == iwae_row
    nothing_measured = compare(module, XS, estimators=["iwae:2"], repeats=3, eval_k=10)
    for path in write_comparison(nothing_measured, tmp_path / "none"):  # the files, the figures empty
        assert path.stat().st_size > 0


PLUGIN_RENYI = """import pyro_vae
from pyro.infer import RenyiELBO


def make_renyi(**options):
    return RenyiELBO(alpha=0.0, **options)


pyro_vae.register_estimator("renyi", make_renyi)
"""


def test_compare_cli_measures_an_estimator_a_plugin_registers(digits_run, tmp_path, monkeypatch, capsys):
    (tmp_path / "plugin_renyi.py").write_text(PLUGIN_RENYI)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "out"
    argv = ["compare", str(digits_run), "--plugin", "plugin_renyi", "--estimators", "renyi:2", "mc:1",
            "--out", str(out), *SMALL]
    try:
        assert main(argv) == 0, capsys.readouterr().err
    finally:
        unregister_all()
        sys.modules.pop("plugin_renyi", None)
    printed = capsys.readouterr().out
    renyi, mc = json.loads((out / "compare.json").read_text())["estimators"]
    assert (renyi["estimator"], renyi["particles"], renyi["value_std"]) == ("renyi", 2, None)
    numbers = [renyi["value_mean"], renyi["bias"],
               *(renyi[g][m] for g in VAE_GROUPS for m in ("grad_var", "snr"))]
    assert all(math.isfinite(v) for v in numbers) and renyi["value_mean"] < 0
    note = f"- `renyi` K=2 {BATCH_ONLY}"
    assert note in printed.splitlines() and note in (out / "compare.md").read_text().splitlines()
