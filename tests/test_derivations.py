"""Numerical checks of the formulas derived in docs/derivations.md, one test per formula.

Where a check is exact (fractions, closed forms) it is asserted to rounding error. Where it
involves Monte Carlo, the seed is fixed and the tolerance is N_SE standard errors computed from
the same samples, so a correct formula passes and a wrong one (a sign, a factor of two, a swapped
argument) fails by many standard errors. The continuous checks use a linear-Gaussian VAE built
with the library, x = W z + b + sigma * noise with z ~ N(0, I), for which p(x) = N(b, W W^T +
sigma^2 I) and p(z|x) are known in closed form.
"""

import math
from fractions import Fraction

import pyro
import pytest
import torch
from pyro import poutine
from torch import nn
from torch.distributions import (
    Categorical,
    MultivariateNormal,
    Normal,
    kl_divergence,
)

from pyro_vae.evaluation.evaluate import elbo_terms, iwae_log_px
from pyro_vae.inference.estimators import log_weights
from pyro_vae.models.likelihoods import Gaussian
from pyro_vae.models.priors import StandardNormal
from pyro_vae.models.vae import VAE

DTYPE = torch.float64
N_SE = 4.0  # tolerance in standard errors: a true statement fails with probability ~6e-5


# ---------------------------------------------------------------- helpers: a linear-Gaussian VAE


class LinearDecoder(nn.Module):
    """z (..., z_dim) -> W z + b, shaped as a (1, 1, D) image."""

    def __init__(self, w, b):
        super().__init__()
        self.linear = nn.Linear(w.shape[1], w.shape[0]).to(DTYPE)
        with torch.no_grad():
            self.linear.weight.copy_(w)
            self.linear.bias.copy_(b)

    def forward(self, z):
        out = self.linear(z)
        return out.reshape(*out.shape[:-1], 1, 1, out.shape[-1])


class AffineEncoder(nn.Module):
    """A hand-written guide q(z|x) = N(A x + c, diag(scale^2)), x flattened; c and scale are
    parameters so that gradients can flow to them."""

    def __init__(self, a, c, scale):
        super().__init__()
        self.register_buffer("a", a)
        self.c = nn.Parameter(c.clone())
        self.scale = nn.Parameter(scale.clone())

    def forward(self, x):
        loc = x.flatten(-3) @ self.a.T + self.c
        return loc, self.scale.expand_as(loc)


def constant_encoder(loc, scale, d):
    """q(z|x) = N(loc, diag(scale^2)) whatever the D-pixel image x is."""
    return AffineEncoder(torch.zeros(loc.shape[-1], d, dtype=DTYPE), loc, scale)


def images(x_flat):
    """(N, D) -> (N, 1, 1, D): the image layout the library expects."""
    return x_flat.reshape(x_flat.shape[0], 1, 1, x_flat.shape[1])


def closed_form_gaussian_kl(mu, sigma):
    """KL(N(mu, diag sigma^2) || N(0, I)) = 1/2 sum(sigma^2 + mu^2 - 1 - log sigma^2)."""
    return 0.5 * (sigma**2 + mu**2 - 1.0 - torch.log(sigma**2)).sum(-1)


class LinearGaussian:
    """p(z) = N(0, I), p(x|z) = N(W z + b, sigma^2 I): marginal and posterior in closed form."""

    def __init__(self, d, z_dim, sigma, orthogonal_columns, seed):
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(d, z_dim, generator=g, dtype=DTYPE)
        if orthogonal_columns:  # W^T W diagonal -> the exact posterior is a diagonal Gaussian
            q, _ = torch.linalg.qr(w)
            w = q * torch.linspace(0.7, 2.0, z_dim, dtype=DTYPE)
        self.w, self.b, self.sigma = w, torch.randn(d, generator=g, dtype=DTYPE), sigma
        self.d, self.z_dim = d, z_dim
        precision = torch.eye(z_dim, dtype=DTYPE) + w.T @ w / sigma**2
        self.post_cov = torch.linalg.inv(precision)
        self.gain = self.post_cov @ w.T / sigma**2  # posterior mean = gain (x - b)

    def vae(self, encoder):
        prior = StandardNormal(self.z_dim).to(DTYPE)
        return VAE(encoder, LinearDecoder(self.w, self.b), prior, Gaussian(self.sigma))

    def marginal(self):
        cov = self.w @ self.w.T + self.sigma**2 * torch.eye(self.d, dtype=DTYPE)
        return MultivariateNormal(self.b, covariance_matrix=cov)

    def log_px(self, x):
        return self.marginal().log_prob(x.flatten(-3))

    def posterior(self, x):
        mean = (x.flatten(-3) - self.b) @ self.gain.T
        return MultivariateNormal(mean, covariance_matrix=self.post_cov)

    def encoder(self, shift=0.0, widen=1.0):
        """The posterior's mean map and marginal standard deviations, optionally with the mean
        shifted by `shift` standard deviations and the scale multiplied by `widen`."""
        sd = self.post_cov.diagonal().sqrt()
        return AffineEncoder(self.gain, -self.gain @ self.b + shift * sd, widen * sd)

    def exact_elbo(self, x, loc, scale):
        """E_q[log p(x|z)] - KL(q || p(z)) for q = N(loc, diag scale^2), in closed form:
        E_q ||x - W z - b||^2 = ||x - W loc - b||^2 + tr(W diag(scale^2) W^T)."""
        resid = x.flatten(-3) - loc @ self.w.T - self.b
        sq = (resid**2).sum(-1) + (scale**2 @ (self.w**2).T).sum(-1)
        recon = -sq / (2 * self.sigma**2) - 0.5 * self.d * math.log(2 * math.pi * self.sigma**2)
        return recon - closed_form_gaussian_kl(loc, scale)


def mean_and_se(values, dim=0):
    """Sample mean and its standard error along `dim`."""
    n = values.shape[dim]
    return values.mean(dim), values.std(dim) / math.sqrt(n)


# ------------------------------------------------------------------- marginalization (discrete)


def test_dice_marginal_likelihood_and_box_posterior_are_exact_fractions():
    boxes = {"red": (6, 8), "blue": (4, 10)}
    prior = {box: Fraction(1, 2) for box in boxes}
    roll = 3
    # P(roll | box) = sum over the unseen die of P(die | box) P(roll | die)
    likelihood = {
        box: sum(Fraction(1, len(dice)) * Fraction(int(roll <= s), s) for s in dice)
        for box, dice in boxes.items()
    }
    assert likelihood["red"] == Fraction(7, 48)
    assert likelihood["blue"] == Fraction(7, 40)
    # the note's 0.145 is 7/48 = 0.14583... cut off after three digits, not rounded
    assert math.floor(float(likelihood["red"]) * 1000) / 1000 == 0.145
    assert round(float(likelihood["red"]), 3) == 0.146

    evidence = sum(prior[box] * likelihood[box] for box in boxes)
    posterior = {box: prior[box] * likelihood[box] / evidence for box in boxes}
    assert evidence == Fraction(77, 480)
    assert posterior == {"red": Fraction(5, 11), "blue": Fraction(6, 11)}
    assert sum(posterior.values()) == 1


def test_simulated_dice_game_matches_bayes_posterior_over_boxes():
    """Play the game as told (one die from each box into the yellow box, one of those rolled)
    and estimate P(red | roll = 3); it must agree with 5/11 within the binomial standard error."""
    torch.manual_seed(0)
    n = 400_000
    red_sides = torch.tensor([6, 8])[torch.randint(0, 2, (n,))]
    blue_sides = torch.tensor([4, 10])[torch.randint(0, 2, (n,))]
    from_red = torch.rand(n) < 0.5
    sides = torch.where(from_red, red_sides, blue_sides)
    rolls = (torch.rand(n) * sides).floor() + 1
    threes = rolls == 3
    m = int(threes.sum())
    p_red = float(from_red[threes].double().mean())
    exact = 5 / 11
    assert abs(m / n - 77 / 480) <= N_SE * math.sqrt((77 / 480) * (1 - 77 / 480) / n)
    assert abs(p_red - exact) <= N_SE * math.sqrt(exact * (1 - exact) / m)


# ------------------------------------------------------------------ marginalization (continuous)


def test_marginal_likelihood_is_the_integral_of_the_library_joint_over_z():
    """log p(x) = log int p(x|z) p(z) dz, the integrand taken from a trace of vae.model, by
    quadrature on a fine grid (z is one-dimensional), against the closed form N(b, WW^T + s^2 I)."""
    lg = LinearGaussian(d=3, z_dim=1, sigma=0.5, orthogonal_columns=False, seed=1)
    vae = lg.vae(constant_encoder(torch.zeros(1, dtype=DTYPE), torch.ones(1, dtype=DTYPE), 3))
    x = images(lg.b + torch.tensor([[0.3, -1.2, 0.8]], dtype=DTYPE))
    grid = torch.linspace(-12.0, 12.0, 24_001, dtype=DTYPE)
    conditioned = poutine.condition(vae.model, data={"z": grid[:, None]})
    trace = poutine.trace(conditioned).get_trace(x.expand(len(grid), -1, -1, -1))
    trace.compute_log_prob()
    log_joint = trace.nodes["z"]["log_prob"] + trace.nodes["x"]["log_prob"]
    step = grid[1] - grid[0]
    log_px = torch.logsumexp(log_joint, 0) + torch.log(step)  # Riemann sum; tails are < e^-70
    assert torch.allclose(log_px, lg.log_px(x)[0], atol=1e-8)


# ------------------------------------------------------------------------------ KL divergence


def test_kl_divergence_is_nonnegative_zero_on_equal_arguments_and_asymmetric():
    p = torch.tensor([0.5, 0.5], dtype=DTYPE)
    q = torch.tensor([0.9, 0.1], dtype=DTYPE)

    def kl(a, b):
        return float((a * torch.log(a / b)).sum())

    assert kl(p, q) == pytest.approx(math.log(5 / 3), abs=1e-12)
    assert kl(q, p) == pytest.approx(0.9 * math.log(1.8) + 0.1 * math.log(0.2), abs=1e-12)
    assert kl(p, q) == pytest.approx(float(kl_divergence(Categorical(p), Categorical(q))))
    assert kl(q, p) == pytest.approx(float(kl_divergence(Categorical(q), Categorical(p))))
    assert kl(p, q) > 0 and kl(q, p) > 0 and kl(p, p) == 0.0
    assert abs(kl(p, q) - kl(q, p)) > 0.1  # 0.511 vs 0.368 nats: D(P||Q) != D(Q||P)


@pytest.mark.parametrize(
    "mu, sigma",
    [([0.0, 0.0, 0.0], [1.0, 1.0, 1.0]), ([0.5, -1.5, 2.0], [0.3, 1.0, 2.5])],
)
def test_closed_form_gaussian_kl_matches_torch_library_and_monte_carlo(mu, sigma):
    mu = torch.tensor(mu, dtype=DTYPE)
    sigma = torch.tensor(sigma, dtype=DTYPE)
    closed = closed_form_gaussian_kl(mu, sigma)

    by_torch = kl_divergence(Normal(mu, sigma), Normal(0.0, 1.0)).sum()
    assert torch.allclose(closed, by_torch, atol=1e-12)

    vae = LinearGaussian(d=2, z_dim=3, sigma=1.0, orthogonal_columns=False, seed=0).vae(
        constant_encoder(mu, sigma, 2)
    )
    x = torch.zeros(4, 1, 1, 2, dtype=DTYPE)
    by_library = elbo_terms(vae.model, vae.guide, x, samples=2)["kl"]
    assert torch.allclose(by_library, closed.expand(4), atol=1e-10)

    pyro.set_rng_seed(0)
    z = mu + sigma * torch.randn(200_000, 3, dtype=DTYPE)
    log_ratio = (Normal(mu, sigma).log_prob(z) - Normal(0.0, 1.0).log_prob(z)).sum(-1)
    mc, se = mean_and_se(log_ratio)
    assert abs(mc - closed) <= N_SE * se + 1e-12  # se = 0 exactly when q = p


# ------------------------------------------------------------------------------ ELBO identity


def test_elbo_plus_kl_to_true_posterior_equals_log_evidence_on_linear_gaussian_vae():
    """log p(x) = ELBO(q) + KL(q(z|x) || p(z|x)) for a q that is not the posterior: exactly with
    the closed-form ELBO, and within standard error with the library's Monte Carlo ELBO."""
    lg = LinearGaussian(d=4, z_dim=2, sigma=0.7, orthogonal_columns=False, seed=2)
    encoder = lg.encoder(shift=0.8, widen=1.4)
    vae = lg.vae(encoder)
    pyro.set_rng_seed(2)
    x = vae.model(n=4).detach()  # four data points drawn from the model itself
    log_px = lg.log_px(x)

    with torch.no_grad():
        loc, scale = encoder(x)
    q = MultivariateNormal(loc, covariance_matrix=torch.diag_embed(scale**2))
    kl_to_posterior = kl_divergence(q, lg.posterior(x))
    exact_elbo = lg.exact_elbo(x, loc, scale)
    assert torch.all(kl_to_posterior > 0.1)  # q is really not the posterior
    assert torch.allclose(exact_elbo + kl_to_posterior, log_px, atol=1e-9)

    # the library's ELBO = recon - KL(q || p(z)), one sample per row, 4000 rows per data point
    m = 4000
    terms = elbo_terms(vae.model, vae.guide, x.repeat(m, 1, 1, 1), samples=1)
    assert torch.allclose(terms["kl"][:4], closed_form_gaussian_kl(loc, scale), atol=1e-10)
    assert torch.allclose(terms["elbo"], terms["recon"] - terms["kl"], atol=1e-10)
    elbo, se = mean_and_se(terms["elbo"].reshape(m, 4))
    assert torch.all((elbo + kl_to_posterior - log_px).abs() <= N_SE * se)
    assert torch.all(elbo < log_px)  # the bound is a bound


def test_log_weights_equal_log_evidence_with_zero_variance_when_q_is_the_posterior():
    """With q(z|x) = p(z|x), w = p(x, z) / q(z|x) = p(x) for every z."""
    lg = LinearGaussian(d=5, z_dim=3, sigma=0.4, orthogonal_columns=True, seed=3)
    assert torch.allclose(lg.post_cov, torch.diag(lg.post_cov.diagonal()), atol=1e-12)
    vae = lg.vae(lg.encoder())
    pyro.set_rng_seed(3)
    x = vae.model(n=6).detach()
    with torch.no_grad():
        lw = log_weights(vae.model, vae.guide, x, 500)
    assert lw.shape == (500, 6)
    assert torch.allclose(lw, lg.log_px(x).expand(500, 6), atol=1e-4)
    assert float(lw.std(0).max()) < 1e-8


# ---------------------------------------------------------------- importance-weighted bound (IWAE)


def test_iwae_bound_equals_elbo_at_k1_rises_with_k_and_approaches_log_evidence():
    lg = LinearGaussian(d=4, z_dim=2, sigma=0.6, orthogonal_columns=True, seed=4)
    # q wider than the posterior keeps Var(w) finite, so the bias estimate below is meaningful
    encoder = lg.encoder(shift=0.7, widen=1.5)
    vae = lg.vae(encoder)
    pyro.set_rng_seed(4)
    x = vae.model(n=2).detach()
    log_px = lg.log_px(x)
    with torch.no_grad():
        exact_elbo = lg.exact_elbo(x, *encoder(x))

    m = 300  # independent IWAE_k estimates per data point
    means, ses = {}, {}
    for k in (1, 10, 100, 1000):
        estimates = iwae_log_px(vae.model, vae.guide, x.repeat(m, 1, 1, 1), k).reshape(m, 2)
        means[k], ses[k] = mean_and_se(estimates)
        assert torch.all(means[k] <= log_px + N_SE * ses[k])  # a lower bound in expectation

    assert torch.all((means[1] - exact_elbo).abs() <= N_SE * ses[1])  # E[IWAE_1] = ELBO
    ks = sorted(means)
    for small, large in zip(ks[:-1], ks[1:], strict=True):
        slack = N_SE * torch.sqrt(ses[small] ** 2 + ses[large] ** 2)
        assert torch.all(means[large] >= means[small] - slack)  # non-decreasing in k
    gap_1, gap_1000 = log_px - means[1], log_px - means[1000]
    assert torch.all(gap_1000 < gap_1 - N_SE * torch.sqrt(ses[1] ** 2 + ses[1000] ** 2))

    # log p(x) - E[IWAE_k] ~ Var(w / p(x)) / (2k) (Burda et al. 2016); estimate Var from weights
    with torch.no_grad():
        lw = log_weights(vae.model, vae.guide, x, 100_000)
    rel_var = torch.exp(lw - log_px).var(0)
    bias_1000 = rel_var / (2 * 1000)
    # allow twice the asymptotic bias: the 1/(2k) formula is only the leading term
    assert torch.all(gap_1000.abs() <= N_SE * ses[1000] + 2 * bias_1000)


# ---------------------------------------------------------------------- reparameterization


def test_reparameterized_guide_sample_has_right_moments_and_pathwise_gradients():
    """z = mu + sigma * eps from vae.guide: mean mu, std sigma, and autograd through the sample
    gives d/dmu E[z^2] = 2 mu, d/dsigma E[z^2] = 2 sigma."""
    mu = torch.tensor([0.5, -1.0, 2.0], dtype=DTYPE)
    sigma = torch.tensor([0.3, 1.0, 1.7], dtype=DTYPE)
    encoder = constant_encoder(mu, sigma, 2)
    vae = LinearGaussian(d=2, z_dim=3, sigma=1.0, orthogonal_columns=False, seed=5).vae(encoder)
    n = 100_000
    pyro.set_rng_seed(5)
    z = vae.guide(torch.zeros(n, 1, 1, 2, dtype=DTYPE))
    assert z.shape == (n, 3)

    z_mean, z_mean_se = mean_and_se(z.detach())
    assert torch.all((z_mean - mu).abs() <= N_SE * z_mean_se)
    std_se = sigma / math.sqrt(2 * (n - 1))  # standard error of a normal sample's std
    assert torch.all((z.detach().std(0) - sigma).abs() <= N_SE * std_se)

    (z**2).mean(0).sum().backward()
    eps = (z.detach() - mu) / sigma
    per_sample_dmu, per_sample_dsigma = 2 * z.detach(), 2 * z.detach() * eps
    # autograd went through the sample: its gradient is the average of the pathwise terms
    assert torch.allclose(encoder.c.grad, per_sample_dmu.mean(0), atol=1e-10)
    assert torch.allclose(encoder.scale.grad, per_sample_dsigma.mean(0), atol=1e-10)
    _, se_mu = mean_and_se(per_sample_dmu)
    _, se_sigma = mean_and_se(per_sample_dsigma)
    assert torch.all((encoder.c.grad - 2 * mu).abs() <= N_SE * se_mu)
    assert torch.all((encoder.scale.grad - 2 * sigma).abs() <= N_SE * se_sigma)


# ---------------------------------------------------------------- Gaussian likelihood and MSE


@pytest.mark.parametrize("sigma", [0.1, math.sqrt(0.5), 1.0, 2.5])
def test_gaussian_likelihood_is_scaled_squared_error_plus_normalizing_constant(sigma):
    torch.manual_seed(6)
    x = torch.randn(3, 2, 4, 5, dtype=DTYPE)
    out = x + 0.3 * torch.randn(3, 2, 4, 5, dtype=DTYPE)
    d = 2 * 4 * 5
    sse = ((x - out) ** 2).sum((-3, -2, -1))
    constant = 0.5 * d * math.log(2 * math.pi * sigma**2)
    log_p = Gaussian(sigma)(out).log_prob(x)
    assert log_p.shape == (3,)
    assert torch.allclose(log_p, -sse / (2 * sigma**2) - constant, atol=1e-4)
    # an "MSE VAE" term sum ||x - x_hat||^2 is -log p(x|z) only after weighting by 1/(2 sigma^2)
    # and adding the constant; the two coincide up to the constant only when 2 sigma^2 = 1
    if sigma == math.sqrt(0.5):
        assert torch.allclose(-log_p, sse + 0.5 * d * math.log(math.pi), atol=1e-4)


# ---------------------------------------------------------------- generation and traversal


def test_generation_from_prior_samples_the_marginal_distribution():
    """x = decoder(z) + noise with z ~ p(z) (vae.model with no data) is distributed as p(x)."""
    lg = LinearGaussian(d=3, z_dim=2, sigma=0.5, orthogonal_columns=False, seed=7)
    vae = lg.vae(lg.encoder())
    n = 40_000
    pyro.set_rng_seed(7)
    x = vae.model(n=n).detach().flatten(-3)
    cov = lg.marginal().covariance_matrix
    mean_se = (cov.diagonal() / n).sqrt()
    assert torch.all((x.mean(0) - lg.b).abs() <= N_SE * mean_se)
    # standard error of a Gaussian sample covariance entry: sqrt((C_ii C_jj + C_ij^2) / n)
    cov_se = ((cov.diagonal()[:, None] * cov.diagonal()[None, :] + cov**2) / n).sqrt()
    assert torch.all((torch.cov(x.T) - cov).abs() <= N_SE * cov_se)


def test_latent_traversal_of_linear_decoder_moves_along_a_column_of_w():
    lg = LinearGaussian(d=4, z_dim=3, sigma=0.5, orthogonal_columns=False, seed=8)
    vae = lg.vae(lg.encoder())
    z0 = torch.tensor([0.2, -0.4, 1.0], dtype=DTYPE)
    steps = torch.linspace(-3.0, 3.0, 7, dtype=DTYPE)
    for j in range(3):
        z = z0.expand(7, 3).clone()
        z[:, j] += steps
        with torch.no_grad():
            pictures = vae.decode(z).flatten(-3)
        expected = lg.w @ z0 + lg.b + steps[:, None] * lg.w[:, j]
        assert torch.allclose(pictures, expected, atol=1e-10)
