"""`pyro-vae diagnose` checked where every number is known in closed form, and on a trained model.

The linear-Gaussian VAE of test_derivations (p(z) = N(0, I), p(x|z) = N(W z + b, sigma^2 I)) has a
Gaussian posterior N(m(x), S) and an exact log p(x). From them: the amortized ELBO of any Gaussian
encoder, the best diagonal Gaussian (mean m, variances 1 / diag(S^-1), the minimizer of KL(q || p))
and the best full-rank one (the posterior itself, approximation gap 0). Monte Carlo tolerances are
N_SE standard errors computed from the same draws (ArviZ MCSE for the NUTS draws); the SVI fit of q*
is allowed OPT_TOL nats per example short of its family's optimum, far below the gaps it must find.
"""

import json
import math
import shutil
import subprocess
import sys

import pyro
import pytest
import torch
from PIL import Image
from torch.distributions import MultivariateNormal, kl_divergence

from pyro_vae.cli import main
from pyro_vae.evaluation.diagnostics import diagnose
from pyro_vae.evaluation.diagnostics.importance import KHAT_GOOD, KHAT_THRESHOLD
from pyro_vae.evaluation.diagnostics.optimal_guide import SVI_PARTICLES, fit_optimal_guide
from pyro_vae.evaluation.diagnostics.report import markdown

from .test_derivations import LinearGaussian

N_SE = 4.0  # a true statement fails with probability ~6e-5 per comparison
OPT_TOL = 0.02  # nats per example that SVI may leave between q* and the best member of its family


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These models are tiny: on a busy 2-core machine a second thread only adds waiting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _mcse(ary, method):
    """arviz-stats' Monte Carlo standard error of draws (chains, draws)."""
    from arviz_stats.base import array_stats

    return float(array_stats.mcse(ary, chain_axis=0, draw_axis=1, method=method))


def _open_posterior(path):
    """The NetCDF posterior diagnose writes, as the DataTree arviz-base made it."""
    import xarray

    return xarray.open_datatree(str(path))


# ------------------------------------------------------------ linear-Gaussian: everything exact


@pytest.fixture(scope="module")
def linear_gaussian():
    """A correlated posterior (W not orthogonal) and an encoder that is shifted by 0.8 marginal sds
    and 1.4 times too wide: weights p/q stay bounded, and q is far from q*."""
    lg = LinearGaussian(d=6, z_dim=3, sigma=0.7, orthogonal_columns=False, seed=2)
    vae = lg.vae(lg.encoder(shift=0.8, widen=1.4))
    pyro.set_rng_seed(2)
    x = vae.model(n=8).detach()
    result = diagnose(vae, x, n_examples=8, mcmc_examples=2, eval_k=4000, svi_steps=400, num_samples=200,
                      warmup=100, chains=2, seed=0)
    return lg, vae, x, result


def _exact_bounds(lg, vae, x):
    """log p(x), L[q] of the encoder, and the best diagonal and full-rank L[q*], in closed form."""
    log_px = lg.log_px(x)
    with torch.no_grad():
        elbo_q = lg.exact_elbo(x, *vae.encoder(x))
    posterior = lg.posterior(x)
    best_diagonal = MultivariateNormal(
        posterior.mean, covariance_matrix=torch.diag(1 / torch.linalg.inv(lg.post_cov).diagonal()))
    return {"log_px": log_px, "elbo_amortized": elbo_q,
            "elbo_optimal_diagonal": log_px - kl_divergence(best_diagonal, posterior),
            "elbo_optimal_full_rank": log_px}


def test_log_px_and_amortized_elbo_match_closed_form_within_monte_carlo_error(linear_gaussian):
    lg, vae, x, result = linear_gaussian
    per = result.per_example
    exact = _exact_bounds(lg, vae, x[per["index"]])
    # light-tailed weights (q wider than p(z|x); q* close to it): the delta-method errors are valid
    assert torch.all(per["khat"] < KHAT_GOOD) and torch.all(per["khat_q_star_full_rank"] < KHAT_GOOD)
    exact["log_px_q_star_full_rank"] = exact["log_px"]
    for name in ("log_px", "elbo_amortized", "log_px_q_star_full_rank"):
        assert torch.all((per[name] - exact[name]).abs() <= N_SE * per[f"{name}_mc_se"]), name


def test_gaps_match_closed_form_on_linear_gaussian_vae(linear_gaussian):
    lg, vae, x, result = linear_gaussian
    per = result.per_example
    exact = _exact_bounds(lg, vae, x[per["index"]])
    for family in ("diagonal", "full_rank"):
        name = f"elbo_optimal_{family}"
        se = per[f"{name}_mc_se"]
        # q* is no better than the family's best (up to MC error), and at most OPT_TOL worse
        assert torch.all(per[name] <= exact[name] + N_SE * se), family
        assert torch.all(per[name] >= exact[name] - N_SE * se - OPT_TOL), family
        exact_approximation = exact["log_px"] - exact[name]
        exact_amortization = exact[name] - exact["elbo_amortized"]
        se_approximation = torch.sqrt(per["log_px_mc_se"] ** 2 + se**2)
        se_amortization = torch.sqrt(per["elbo_amortized_mc_se"] ** 2 + se**2)
        approximation = per[f"approximation_gap_{family}"]
        amortization = per[f"amortization_gap_{family}"]
        assert torch.all((approximation - exact_approximation).abs() <= N_SE * se_approximation + OPT_TOL)
        assert torch.all((amortization - exact_amortization).abs() <= N_SE * se_amortization + OPT_TOL)
        summary = result.summary["gaps"][family]
        assert summary["approximation"]["mean"] == pytest.approx(float(approximation.mean()))
        assert summary["amortization"]["mean"] == pytest.approx(float(amortization.mean()))
        assert summary["amortization"]["se"] == pytest.approx(float(amortization.std() / math.sqrt(8)))
    # the gaps are large against the tolerances, so a wrong estimate could not pass
    gap_diagonal = exact["log_px"] - exact["elbo_optimal_diagonal"]
    assert torch.all(gap_diagonal > 5 * OPT_TOL)
    assert torch.all(exact["elbo_optimal_diagonal"] - exact["elbo_amortized"] > 20 * OPT_TOL)


def test_optimal_guide_fitted_in_chunks_reaches_the_optimum_for_every_example(linear_gaussian):
    """With memory for 3 examples at a time, each chunk gets its own optimizer; every example's
    diagonal q* must still end within OPT_TOL of the exact optimum (exact ELBO of the fitted q*)."""
    lg, vae, x, _ = linear_gaussian
    pyro.set_rng_seed(4)
    q_star = fit_optimal_guide(vae, x, "diagonal", steps=200, max_elements=3 * SVI_PARTICLES * x[0].numel())
    exact = _exact_bounds(lg, vae, x)
    with torch.no_grad():
        fitted = lg.exact_elbo(x, q_star["z"].loc, q_star["z"].log_scale.exp())
        encoder = lg.exact_elbo(x, *vae.encoder(x))
    assert torch.all(fitted <= exact["elbo_optimal_diagonal"] + 1e-9)  # an exact bound
    assert torch.all(fitted >= exact["elbo_optimal_diagonal"] - OPT_TOL)
    assert torch.all(fitted > encoder + 20 * OPT_TOL)  # every chunk moved, far


def test_nuts_recovers_exact_posterior_mean_and_covariance(linear_gaussian):
    lg, vae, x, result = linear_gaussian
    mcmc = result.summary["mcmc"]
    index = [e["index"] for e in mcmc["examples"]]
    assert result.nuts.z.shape == (2, 200, 2, 3)  # chains, draws, examples, z_dim
    posterior = lg.posterior(x[index])
    assert mcmc["r_hat_max"] < 1.05 and sum(mcmc["divergences"]) == 0
    for i, example in enumerate(mcmc["examples"]):
        z = result.nuts.z[:, :, i].double()  # (chains, draws, z_dim)
        mean, cov = posterior.mean[i], posterior.covariance_matrix[i]
        mcse_mean = torch.as_tensor([_mcse(z[..., u].numpy(), "mean") for u in range(3)])
        assert torch.all((torch.tensor(example["posterior_mean"]) - mean).abs() <= N_SE * mcse_mean)
        mcse_sd = torch.as_tensor([_mcse(z[..., u].numpy(), "sd") for u in range(3)])
        sd = torch.tensor(example["posterior_sd"])
        assert torch.all((sd - cov.diagonal().sqrt()).abs() <= N_SE * mcse_sd)
        centred = z - z.mean((0, 1))
        for u in range(3):
            for v in range(u + 1, 3):
                product = (centred[..., u] * centred[..., v]).numpy()
                error = abs(product.mean() - float(cov[u, v]))
                assert error <= N_SE * _mcse(product, "mean"), (u, v)
        # what the summary compares: q's mean is 0.8 marginal sds off, its sd 1.4 times too wide
        assert example["q_mean"] == pytest.approx(vae.posterior(x[index[i]:index[i] + 1]).mean[0].tolist())
        shift = ((torch.tensor(example["q_mean"]) - torch.tensor(example["posterior_mean"])).abs() / sd)
        assert example["mean_shift_in_posterior_sd"] == pytest.approx(float(shift.mean()))
        shift_error = float(((mcse_mean + 0.8 * mcse_sd) / sd).max())  # from errors in m and s
        assert abs(example["mean_shift_in_posterior_sd"] - 0.8) <= N_SE * shift_error
        assert abs(example["q_sd_over_posterior_sd"] - 1.4) <= N_SE * float((1.4 * mcse_sd / sd).max())


def test_inference_data_holds_the_nuts_draws_and_q(linear_gaussian, tmp_path):
    _, _, _, result = linear_gaussian
    path = tmp_path / "posterior.nc"
    result.posterior.to_netcdf(str(path))
    idata = _open_posterior(path)
    assert idata.posterior["z"].dims == ("chain", "draw", "example", "latent")
    assert torch.allclose(torch.as_tensor(idata.posterior["z"].values), result.nuts.z.double())
    assert list(idata.posterior["example"].values) == [e["index"] for e in result.summary["mcmc"]["examples"]]
    assert torch.allclose(torch.as_tensor(idata.constant_data["q_loc"].values), result.nuts.q_loc.double())


@pytest.mark.parametrize("shift, widen, bad", [(0.0, 1.3, False), (2.0, 0.3, True)])
def test_khat_is_low_for_a_good_q_and_high_for_a_bad_one(shift, widen, bad):
    """q = N(m + shift sd, widen^2 S) against p(z|x) = N(m, S), S diagonal. For widen > 1 the weights
    p/q are bounded: k = 0. For widen < 1 they grow like exp((1 - widen^2) |eps|^2 / 2), a tail of
    index 1 / (1 - widen^2): k = 1 - widen^2 = 0.91 (the shift makes finite samples look worse still)."""
    lg = LinearGaussian(d=8, z_dim=5, sigma=0.4, orthogonal_columns=True, seed=3)
    vae = lg.vae(lg.encoder(shift=shift, widen=widen))
    pyro.set_rng_seed(3)
    x = vae.model(n=10).detach()
    result = diagnose(vae, x, n_examples=10, mcmc_examples=0, eval_k=2000, svi_steps=1, seed=1)
    khat, share = result.per_example["khat"], result.summary["psis"]["share_above_threshold"]
    if bad:
        assert torch.all(khat > KHAT_THRESHOLD) and share == 1.0
        assert "not to be trusted" in markdown(result.summary).split("\n")[4]  # the log p(x) row
    else:
        assert torch.all(khat < KHAT_GOOD) and share == 0.0
        assert "not to be trusted" not in markdown(result.summary).split("\n")[4]


# ------------------------------------------------------------------ a trained model, via the CLI

DIAGNOSE = ["--n-examples", "40", "--mcmc-examples", "2", "--eval-k", "1000", "--svi-steps", "200",
            "--num-samples", "50", "--warmup", "50", "--quiet"]


@pytest.fixture(scope="module")
def diagnosed_run(digits_run, tmp_path_factory):
    """A copy of the digits run with `pyro-vae diagnose` run on it."""
    run = tmp_path_factory.mktemp("diagnose") / "digits"
    shutil.copytree(digits_run, run)
    assert main(["diagnose", str(run), *DIAGNOSE]) == 0
    return run


def test_log_px_above_optimal_above_amortized_elbo_on_trained_digits(diagnosed_run):
    """log p(x) >= L[q*] >= L[q] for every example, within Monte Carlo error (log p(x) only where
    k-hat says its estimate can be trusted)."""
    per = {k: torch.tensor(v) for k, v in json.loads((diagnosed_run / "diagnose.json").read_text())
           ["per_example"].items()}
    trusted = per["khat"] <= KHAT_THRESHOLD
    assert trusted.double().mean() > 0.5
    for family in ("diagonal", "full_rank"):
        q_star, se = per[f"elbo_optimal_{family}"], per[f"elbo_optimal_{family}_mc_se"]
        slack = N_SE * torch.sqrt(se**2 + per["elbo_amortized_mc_se"] ** 2)
        assert torch.all(q_star >= per["elbo_amortized"] - slack)
        slack = N_SE * torch.sqrt(se**2 + per["log_px_mc_se"] ** 2)
        assert torch.all((per["log_px"] >= q_star - slack)[trusted])
    # the richer family (started from the diagonal q*) is no worse
    se = torch.sqrt(per["elbo_optimal_full_rank_mc_se"] ** 2 + per["elbo_optimal_diagonal_mc_se"] ** 2)
    assert torch.all(per["elbo_optimal_full_rank"] >= per["elbo_optimal_diagonal"] - N_SE * se)
    # and the amortization gap is real: SVI improved on the encoder by more than MC error on average
    gap = per["amortization_gap_diagonal"]
    assert gap.mean() > N_SE * gap.std() / math.sqrt(len(gap))


def test_diagnose_writes_json_markdown_figures_and_netcdf(diagnosed_run):
    summary = json.loads((diagnosed_run / "diagnose.json").read_text())
    assert summary["n_examples"] == 40 and summary["k"] == 1000 and len(summary["per_example"]["khat"]) == 40
    assert len(set(summary["per_example"]["index"])) == 40
    for bound in summary["bounds"].values():
        assert bound["mean"] < 0 and bound["se"] > 0
    text = (diagnosed_run / "diagnose.md").read_text()
    assert "nats per example" in text and "amortization gap" in text and "R-hat" in text
    for figure in ("diagnose_khat.png", "diagnose_posterior.png"):
        with Image.open(diagnosed_run / figure) as im:
            assert im.format == "PNG" and im.size[0] > 100
    idata = _open_posterior(diagnosed_run / "diagnose_posterior.nc")
    assert idata.posterior["z"].shape == (2, 50, 2, 20)
    assert list(idata.posterior["example"].values) == summary["per_example"]["index"][:2]


@pytest.mark.parametrize("flags, message", [
    (["--n-examples", "0"], "--n-examples must be a positive integer"),
    (["--n-examples", "5", "--mcmc-examples", "6"], "--mcmc-examples must be between 0 and"),
    (["--n-examples", "100000"], "--n-examples must be between 1 and the 120 test examples"),
    (["--eval-k", "1"], "--eval-k must be at least 2"),
    (["--chains", "0"], "--chains must be a positive integer"),
])
def test_bad_diagnose_input_is_one_line_and_exit_2(digits_run, flags, message, capsys):
    assert main(["diagnose", str(digits_run), "--quiet", *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not (digits_run / "diagnose.json").exists()


def test_missing_run_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["diagnose", str(tmp_path / "nope"), "--quiet"]) == 2
    assert "not a pyro-vae run directory" in capsys.readouterr().err


def test_importing_the_package_does_not_import_arviz():
    code = ("import sys, pyro_vae, pyro_vae.cli; assert not [m for m in sys.modules "
            "if m.split('.')[0] in ('arviz', 'arviz_base', 'arviz_stats')]")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_khat_is_inf_below_the_draws_a_tail_fit_needs_never_nan_and_finite_above():
    from pyro_vae.evaluation.diagnostics.importance import pareto_khat

    log_w = torch.randn(25, 4, generator=torch.Generator().manual_seed(0))
    assert torch.isinf(pareto_khat(log_w[:24])).all()  # a tail of 24 // 5 = 4 draws: no fit
    # 25 draws, a tail of 5: arviz-stats 0.x fits it, 1.x (Python >= 3.12) rejects it; never nan
    assert not torch.isnan(pareto_khat(log_w)).any()
    log_w = torch.randn(30, 4, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(pareto_khat(log_w)).all()  # a tail of 6: fitted by both lines
