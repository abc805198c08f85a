"""The mixture prior's density (priors.DiagonalNormalMixture): exact for narrow components against a
float64 reference, and cheap under a data plate (expanding it keeps the (K, D) parameters)."""

import pytest
import torch
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

from pyro_vae.models.priors import DiagonalNormalMixture

K, D = 50, 20


def reference_log_prob(logits, loc, scale, z):
    """torch's own mixture with the direct quadratic form, all in float64."""
    mix = MixtureSameFamily(Categorical(logits=logits.double()),
                            Independent(Normal(loc.double(), scale.double()), 1))
    return mix.log_prob(z.double())


@pytest.mark.parametrize("component_scale", [1.0, 1e-1, 1e-2, 1e-3, 1e-4])
def test_log_prob_is_exact_for_narrow_components(component_scale):
    """z drawn near a component (within its own scale), |mu| ~ 2: float32 within 1e-3 nats of float64."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(K, generator=gen)
    loc = 2 * torch.randn(K, D, generator=gen)
    scale = component_scale * torch.exp(0.2 * torch.randn(K, D, generator=gen))
    k = torch.randint(K, (64,), generator=gen)
    z = loc[k] + scale[k] * torch.randn(64, D, generator=gen)
    got = DiagonalNormalMixture(logits, loc, scale).log_prob(z)
    assert got.dtype == torch.float32
    error = (got.double() - reference_log_prob(logits, loc, scale, z)).abs().max()
    assert error <= 1e-3, error


def test_gradients_match_the_float64_reference():
    gen = torch.Generator().manual_seed(1)
    loc = (2 * torch.randn(K, D, generator=gen)).requires_grad_()
    scale = (1e-2 * torch.rand(K, D, generator=gen) + 1e-2).requires_grad_()
    z = loc.detach()[:8] + scale.detach()[:8] * torch.randn(8, D, generator=gen)
    logits = torch.zeros(K)
    got = torch.autograd.grad(DiagonalNormalMixture(logits, loc, scale).log_prob(z).sum(), [loc, scale])
    want = torch.autograd.grad(reference_log_prob(logits, loc, scale, z).sum(), [loc, scale])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-3)  # w: float64 math, cast back


def test_a_plate_expands_the_batch_shape_not_the_parameters():
    gen = torch.Generator().manual_seed(2)
    p = DiagonalNormalMixture(torch.zeros(K), torch.randn(K, D, generator=gen), torch.ones(K, D))
    wide = p.expand((3, 100))
    assert wide.batch_shape == (3, 100) and wide.event_shape == (D,)
    assert wide.loc is p.loc and wide.scale is p.scale
    z = torch.randn(3, 100, D, generator=gen)
    torch.testing.assert_close(wide.log_prob(z), p.log_prob(z))
    assert wide.sample().shape == (3, 100, D) and wide.mean.shape == (3, 100, D)
