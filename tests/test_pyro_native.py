"""The models the library builds are Pyro programs that Pyro's own SVI trains: model() and guide()
register their parameters in Pyro's param store (one param site per parameter tensor), so
SVI(vae.model, vae.guide, pyro.optim.Adam(...), loss) steps exactly the module's tensors, with every
estimator of the registry and without a warning."""

import io
import math
import warnings
from contextlib import nullcontext

import pyro
import pytest
import torch
from pyro import poutine
from torch import nn

from pyro_vae.data import load_dataset
from pyro_vae.inference.estimators import ESTIMATORS, make_estimator
from pyro_vae.models.vae import build_vae
from pyro_vae.param_store import param_sites

STEPS, WINDOW, BATCH = 80, 10, 64
SMALL = {"hidden": [32], "z_dim": 4}


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits").train_x[:512]


def _svi_losses(vae, estimator, digits, steps=STEPS, seed=0, lr=1e-2):
    """SVI with pyro.optim.Adam for `steps` minibatches of the digits, every warning an error; the
    per-step losses and the SVI object."""
    pyro.set_rng_seed(seed)
    particles = 1 if estimator in ("mc", "analytic") else 4
    elbo = make_estimator(estimator, particles)
    svi = pyro.infer.SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": lr}), loss=elbo)
    gen = torch.Generator().manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        losses = [svi.step(digits[torch.randint(len(digits), (BATCH,), generator=gen)]) for _ in range(steps)]
    return torch.tensor(losses, dtype=torch.float64), svi


def _assert_falls(losses):
    """The mean of the last WINDOW losses is below the mean of the first WINDOW by more than 4
    standard errors of the difference (each window's spread, trend included, taken as noise)."""
    first, last = losses[:WINDOW], losses[-WINDOW:]
    se = math.sqrt(float(first.var() + last.var()) / WINDOW)
    assert float(first.mean() - last.mean()) > 4 * se, (first.mean(), last.mean(), se)


def _moved(vae, before):
    return {n for n, p in vae.named_parameters() if not torch.equal(p.detach(), before[n])}


def _snapshot(vae):
    return {n: p.detach().clone() for n, p in vae.named_parameters()}


@pytest.mark.parametrize("model", ["vae", "ae"])
@pytest.mark.parametrize("estimator", list(ESTIMATORS))
def test_pyro_svi_with_pyro_optim_trains_every_parameter(estimator, model, digits):
    pyro.set_rng_seed(0)
    vae = build_vae(digits.shape[1:], model=model, **SMALL)
    before = _snapshot(vae)
    losses, svi = _svi_losses(vae, estimator, digits)
    assert _moved(vae, before) == set(before)
    _assert_falls(losses)
    # the optimizer stepped the module's own tensors, one Adam each, and the store holds them
    assert {id(p) for p in svi.optim.optim_objs} == {id(p) for p in vae.parameters()}
    assert {id(p) for _, p in pyro.get_param_store().named_parameters()} == {id(p) for p in vae.parameters()}


@pytest.mark.parametrize("options, estimator, learned", [
    ({"prior": "learned", "likelihood": "gaussian-learned"}, "analytic",
     {"prior.loc", "prior.raw_scale", "likelihood.raw_scale"}),
    ({"prior": "mog", "prior_components": 3, "likelihood": "laplace-learned"}, "mc",
     {"prior.logits", "prior.loc", "prior.raw_scale", "likelihood.raw_scale"}),
    ({"prior": "vamp", "prior_components": 5}, "iwae", {"prior.pseudo_inputs"}),
])
def test_pyro_svi_trains_learned_prior_and_likelihood_parameters(options, estimator, learned, digits):
    pyro.set_rng_seed(0)
    vae = build_vae(digits.shape[1:], **SMALL, **options)
    before = _snapshot(vae)
    losses, _ = _svi_losses(vae, estimator, digits, steps=40)
    assert learned <= set(before)
    assert _moved(vae, before) == set(before)
    assert torch.isfinite(losses).all()


def test_model_and_guide_traces_hold_each_parameter_they_use_as_a_param_site(digits):
    vae = build_vae(digits.shape[1:], prior="vamp", prior_components=3, **SMALL)
    x = digits[:5]
    guide = poutine.trace(vae.guide).get_trace(x)
    model = poutine.trace(poutine.replay(vae.model, trace=guide)).get_trace(x)

    def params(trace):
        return {name: site["value"] for name, site in trace.nodes.items() if site["type"] == "param"}

    assert params(guide) == {f"vae$$${n}": p for n, p in vae.encoder.named_parameters(prefix="encoder")}
    names = {p: n for n, p in vae.named_parameters()}  # one name per tensor: the encoder's its own
    expected = {f"vae$$${names[p]}": p for part in ("decoder", "prior", "likelihood")
                for p in getattr(vae, part).parameters()}
    assert "vae$$$encoder.net.0.weight" in expected  # the VampPrior runs the guide's encoder
    assert params(model).keys() == expected.keys()
    assert all(params(model)[n] is p for n, p in expected.items())  # the tensors themselves, not copies


def test_param_sites_can_be_turned_off_for_a_block_and_come_back_after_it(digits):
    """What step.SVIStep does, as it optimizes the parameters itself: no sites, the store untouched."""
    vae, x = build_vae(digits.shape[1:], **SMALL), digits[:3]

    def param_sites_in_a_trace():
        guide = poutine.trace(vae.guide).get_trace(x)
        model = poutine.trace(poutine.replay(vae.model, trace=guide)).get_trace(x)
        return [n for trace in (guide, model) for n, site in trace.nodes.items() if site["type"] == "param"]

    with param_sites(False):
        assert param_sites_in_a_trace() == []
        with param_sites(True):
            assert len(param_sites_in_a_trace()) == len(list(vae.parameters()))
        pyro.clear_param_store()
        assert param_sites_in_a_trace() == [] and not pyro.get_param_store().keys()
    assert len(param_sites_in_a_trace()) == len(list(vae.parameters()))


def test_a_model_trained_by_pyro_svi_saves_and_loads_as_a_state_dict(digits):
    pyro.set_rng_seed(0)
    vae = build_vae(digits.shape[1:], prior="learned", **SMALL)
    _svi_losses(vae, "mc", digits, steps=5)
    buffer = io.BytesIO()
    torch.save(vae.state_dict(), buffer)
    buffer.seek(0)
    copy = build_vae(digits.shape[1:], prior="learned", **SMALL)
    copy.load_state_dict(torch.load(buffer, weights_only=True))
    elbo, x = make_estimator("mc"), digits[:32]
    values = []
    for model in (vae, copy):  # the copy's tensors replace the live vae's in the store: one warning
        pyro.set_rng_seed(1)
        with pytest.warns(UserWarning, match="another live model") if model is copy else nullcontext():
            values.append(elbo.loss(model.model, model.guide, x))
    assert values[0] == values[1]


def test_frozen_parameters_stay_out_of_the_param_store_and_unchanged(digits):
    vae = build_vae(digits.shape[1:], **SMALL)
    vae.decoder.requires_grad_(False)
    before = _snapshot(vae)
    _svi_losses(vae, "mc", digits, steps=3)
    assert _moved(vae, before) == {n for n in before if n.startswith("encoder.")}
    assert not any(name.startswith("vae$$$decoder.") for name in pyro.get_param_store().keys())


def test_a_parameter_the_store_would_copy_is_refused(digits):
    vae = build_vae(digits.shape[1:], **SMALL)
    layer = vae.encoder.net[0]
    layer.weight = nn.Parameter(layer.weight.detach().t().contiguous().t())  # same values, transposed layout
    with pytest.raises(ValueError, match="'vae\\$\\$\\$encoder.net.0.weight' is not contiguous"):
        vae.guide(digits[:2])


def test_a_vampprior_registers_each_tensor_once_and_a_later_model_replaces_it_cleanly():
    """The VampPrior reaches the encoder through the prior too: each tensor still has one name in the
    store, so a model built later with the same names replaces them without breaking the store's
    tensor -> name map (a KeyError once, when a grid trained a VampPrior run and then another)."""
    x = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(0)).bernoulli()
    for prior in ("vamp", "normal", "vamp"):
        vae = build_vae((1, 8, 8), hidden=[16], z_dim=3, prior=prior, prior_components=4)
        poutine.trace(poutine.replay(vae.model, trace=poutine.trace(vae.guide).get_trace(x))).get_trace(x)
        store = pyro.get_param_store()
        names = [store.param_name(p) for p in vae.parameters() if p.requires_grad]
        assert len(set(names)) == len(names) and None not in names
        assert set(names) <= set(store.keys())
