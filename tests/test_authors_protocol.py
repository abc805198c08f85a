"""The VampPrior authors' protocol, each difference an option: He-normal initialization, AdamNormGrad,
their held-out binarization draw, their early-stopping count during the warm-up, the clamped
log-variance, and pseudo-inputs through Hardtanh(0, 1) started at N(0.05, 0.01^2). The references here
are retyped from the authors' code (jmtomczak/vae_vampprior, sajadn/Exemplar-VAE) as that code runs."""

import importlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pyro_vae.cli import main
from pyro_vae.config import ADDED_SETTINGS, Config
from pyro_vae.data import AUTHORS_SEED, binarize_like_authors
from pyro_vae.errors import InputError
from pyro_vae.models.kind import check_config
from pyro_vae.models.nets import LOG_VARIANCE_RANGE, he_init
from pyro_vae.models.priors import AUTHORS_INIT
from pyro_vae.models.vae import build_vae
from pyro_vae.optim import AdamNormGrad, make_optimizer
from pyro_vae.presets import AUTHORS, PRESETS, preset_settings
from pyro_vae.training.run_dir import read_config
from pyro_vae.training.train_data import prepare_data

train_module = importlib.import_module("pyro_vae.training.train")

RUNS = Path(__file__).resolve().parents[1] / "docs" / "runs"
SMALL = {"dataset": "digits", "train_size": 300, "test_size": 60, "hidden": [16], "z_dim": 2,
         "batch_size": 50, "eval_k": 5}
Z = 4.5  # tolerance in standard errors: a false alarm about once in 150,000 checks


# -- 1. He-normal initialization ------------------------------------------------------------------

def test_he_init_draws_every_linear_weight_from_n_0_2_over_fan_in_and_keeps_the_biases():
    """Each layer's weights: mean 0 and variance 2/fan_in, each within Z standard errors (the variance's
    s.e. is var * sqrt(2 / (n - 1)) for normal draws); PyTorch's default (variance 1/(3 fan_in)) fails."""
    torch.manual_seed(0)
    vae = build_vae((1, 28, 28), encoder="gated-mlp", hidden=[300, 300], z_dim=40)
    linears = [m for m in vae.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 2 * (2 * 2 + 1)  # two GatedDense (two Linear each) and the output layer, twice
    biases = [m.bias.detach().clone() for m in linears]
    he_init(vae)
    for m, bias in zip(linears, biases, strict=True):
        w = m.weight.detach().double().flatten()
        n, var = w.numel(), 2.0 / m.in_features
        assert abs(w.mean()) < Z * math.sqrt(var / n)
        assert abs(w.var() - var) < Z * var * math.sqrt(2 / (n - 1))
        assert torch.equal(m.bias, bias)  # the authors' he_init leaves the biases to PyTorch


def test_weight_init_he_is_applied_when_a_run_starts(tmp_path, monkeypatch):
    """--weight-init he reaches the model: the weights the first step sees have the He variance."""
    seen = {}

    def capture(self):
        layer = next(m for m in self.model.pair.encoder.modules() if isinstance(m, nn.Linear))
        seen["var"], seen["fan_in"] = float(layer.weight.detach().double().var()), layer.in_features
        seen["n"] = layer.weight.numel()
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module.Trainer, "run_epoch", capture)
    config = Config.from_dict({**SMALL, "hidden": [200], "weight_init": "he"})
    with pytest.raises(KeyboardInterrupt):
        train_module.train(config, tmp_path / "run", progress=False)
    var = 2.0 / seen["fan_in"]
    assert abs(seen["var"] - var) < Z * var * math.sqrt(2 / (seen["n"] - 1))


# -- 2. AdamNormGrad ------------------------------------------------------------------------------

def _adam_normgrad_reference(params, grads_per_step, lr, betas=(0.9, 0.999), eps=1e-8):
    """The authors' AdamNormGrad step by step (retyped): g / (||g|| + 1e-7), then Adam with their
    placement of eps (sqrt(v) + eps, then the bias corrections folded into the step size)."""
    params = [p.detach().clone().double() for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for t, grads in enumerate(grads_per_step, start=1):
        for i, g in enumerate(grads):
            g = g.double() / (torch.linalg.vector_norm(g.double()) + 1e-7)
            m[i] = betas[0] * m[i] + (1 - betas[0]) * g
            v[i] = betas[1] * v[i] + (1 - betas[1]) * g * g
            step = lr * math.sqrt(1 - betas[1] ** t) / (1 - betas[0] ** t)
            params[i] = params[i] - step * m[i] / (v[i].sqrt() + eps)
    return params


@pytest.mark.parametrize("fused", [False, True])
def test_adam_normgrad_matches_the_authors_update_and_differs_from_adam(fused):
    """Three steps whose gradients differ in size by 100x: AdamNormGrad follows the retyped reference
    (to float32 rounding), and plain Adam, which sees the sizes, ends elsewhere."""
    torch.manual_seed(1)
    shapes = [(5, 3), (3,)]
    start = [torch.randn(s) for s in shapes]
    steps = [[torch.randn(s) * scale for s in shapes] for scale in (1.0, 100.0, 0.01)]
    ends = {}
    for name in ("adam-normgrad", "adam"):
        params = [nn.Parameter(p.clone()) for p in start]
        opt = make_optimizer(name, params, lr=0.1, fused=fused)
        assert isinstance(opt, AdamNormGrad) == (name == "adam-normgrad")
        for grads in steps:
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
            opt.step()
        ends[name] = [p.detach() for p in params]
    expected = _adam_normgrad_reference(start, steps, lr=0.1)
    for got, want in zip(ends["adam-normgrad"], expected, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert any((a - b).abs().max() > 1e-3 for a, b in zip(ends["adam"], expected, strict=True))


def test_adam_normgrad_divides_each_gradient_by_its_own_norm():
    a, b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2, 2))
    a.grad, b.grad = torch.tensor([3.0, 0.0, 4.0]), torch.full((2, 2), 0.5)
    AdamNormGrad([a, b], lr=1e-3).normalize_gradients()
    torch.testing.assert_close(a.grad, torch.tensor([3.0, 0.0, 4.0]) / (5 + 1e-7))
    torch.testing.assert_close(b.grad, torch.full((2, 2), 0.5) / (1 + 1e-7))


def test_adam_normgrad_skips_a_step_the_fused_check_marks_non_finite():
    """The trainer's on-device found_inf still stops the step (a NaN gradient stays NaN when divided)."""
    p = nn.Parameter(torch.ones(3))
    opt = AdamNormGrad([p], lr=0.1, fused=True)
    opt.found_inf = torch.ones(())
    p.grad = torch.tensor([1.0, math.nan, 2.0])
    opt.step()
    assert torch.equal(p.detach(), torch.ones(3))


def test_unknown_optimizer_is_an_input_error():
    with pytest.raises(InputError, match="unknown optimizer 'sgd'"):
        make_optimizer("sgd", [nn.Parameter(torch.zeros(1))], lr=0.1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_adam_normgrad_under_a_cuda_graph_equals_its_eager_steps():
    """The normalization is captured with the fused, capturable Adam step: replaying the graph gives the
    eager run's parameters."""
    torch.manual_seed(2)
    start, grads = torch.randn(64, device="cuda"), [torch.randn(64, device="cuda") * s for s in (1, 50, 3, 9)]
    eager = nn.Parameter(start.clone())
    opt = AdamNormGrad([eager], lr=0.05, fused=True, capturable=True)
    for g in grads:
        eager.grad = g.clone()
        opt.step()
    graphed = nn.Parameter(start.clone())
    opt = AdamNormGrad([graphed], lr=0.05, fused=True, capturable=True)
    graphed.grad = grads[0].clone()
    opt.step()  # the state exists before capture
    feed = grads[1].clone()
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        with torch.cuda.graph(graph):
            graphed.grad.copy_(feed)
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    for g in grads[1:]:
        feed.copy_(g)
        graph.replay()
    torch.testing.assert_close(graphed.detach(), eager.detach())


# -- 3. The held-out binarization draw ------------------------------------------------------------

def _authors_loader_reference(x_train_uint8, x_test_uint8, validation):
    """The authors' Fashion-MNIST/MNIST loading, retyped (sajadn/Exemplar-VAE, base_load_data with a fixed
    validation set): pixels / 255. in float64, validation = the last `validation` training images,
    np.random.seed(777), then binomial draws for validation and then test."""
    x_train = x_train_uint8.reshape(len(x_train_uint8), -1) / 255.
    x_test = x_test_uint8.reshape(len(x_test_uint8), -1) / 255.
    n = len(x_train)
    x_val, x_train = x_train[n - validation:], x_train[:n - validation]
    np.random.seed(777)
    x_val = np.random.binomial(1, x_val)
    x_test = np.random.binomial(1, x_test)
    return x_train, x_val, x_test


@pytest.fixture
def uint8_dataset(tmp_path):
    rng = np.random.default_rng(5)
    x_train = rng.integers(0, 256, (30, 4, 5), dtype=np.uint8)
    x_test = rng.integers(0, 256, (12, 4, 5), dtype=np.uint8)
    path = tmp_path / "small.npz"
    np.savez(path, x_train=x_train, x_test=x_test)
    return path, x_train, x_test


def test_heldout_authors_reproduces_the_authors_draw_call_for_call(uint8_dataset):
    """The validation images, their binary draw and the test set's are the reference's, bit for bit; the
    training images stay probabilities (drawn each epoch) in their order; NumPy's global state is left
    as it was."""
    path, x_train, x_test = uint8_dataset
    state = np.random.get_state()
    try:
        ref_train, ref_val, ref_test = _authors_loader_reference(x_train, x_test, validation=8)
    finally:
        np.random.set_state(state)
    before = np.random.get_state()[1].copy()
    data = prepare_data(Config.from_dict({"dataset": str(path), "validation_size": 8, "heldout": "authors",
                                          "binarize": "dynamic"}))
    assert np.array_equal(np.random.get_state()[1], before)
    assert np.array_equal(data.val_x.flatten(1).numpy(), ref_val)
    assert np.array_equal(data.test_x.flatten(1).numpy(), ref_test)
    torch.testing.assert_close(data.train_x.flatten(1).double(), torch.as_tensor(ref_train), rtol=0,
                               atol=1e-7)


def test_the_order_of_the_draws_matters_so_the_test_above_can_fail(uint8_dataset):
    """Drawing test before validation, or the validation images from the front, gives other binary sets."""
    _, x_train, x_test = uint8_dataset
    val, test = binarize_like_authors(torch.as_tensor(x_train[-8:] / 255.).float().unsqueeze(1),
                                      torch.as_tensor(x_test / 255.).float().unsqueeze(1))
    swapped = np.random.RandomState(AUTHORS_SEED).binomial(1, x_test.reshape(12, -1) / 255.)
    assert not np.array_equal(test.flatten(1).numpy(), swapped)
    front = np.random.RandomState(AUTHORS_SEED).binomial(1, x_train[:8].reshape(8, -1) / 255.)
    assert not np.array_equal(val.flatten(1).numpy(), front)


def test_heldout_seeded_is_unchanged_by_the_option(uint8_dataset):
    """The default keeps pyro-vae's draw: other validation images than the authors' last ones."""
    path, x_train, _ = uint8_dataset
    data = prepare_data(Config.from_dict({"dataset": str(path), "validation_size": 8, "binarize": "none"}))
    assert not torch.equal(data.val_x.flatten(1), torch.as_tensor(x_train[-8:].reshape(8, -1) / 255.).float())


# -- 4. The early-stopping count during the warm-up -----------------------------------------------

def _authors_stop_epoch(values, patience, warmup, epochs):
    """The authors' loop (experiment_vae / run_density_estimation), retyped: the last epoch trained."""
    best, e = math.inf, 0
    for epoch in range(1, epochs + 1):
        loss = -values[epoch - 1]
        if loss < best:
            e, best = 0, loss
        else:
            e += 1
            if epoch < warmup:
                e = 0
            if e > patience:
                return epoch
    return epochs


@pytest.mark.parametrize("values", [
    [-1.0, -2, -3, -4, -5, -6, -7, -8, -9, -10],  # never better after epoch 1
    [-5.0, -4, -6, -7, -3, -8, -9, -9.5, -9.6, -9.7],  # a new best inside the warm-up and one after
    [-5.0, -6, -7, -8, -9, -10, -4, -11, -12, -13],  # a new best after the count has run
])
def test_early_stop_rule_authors_stops_where_the_authors_loop_stops(tmp_path, monkeypatch, values):
    monkeypatch.setattr(train_module.Trainer, "validation_metrics",
                        lambda self: {"validation_elbo": values[self.epoch - 1]})
    settings = {"early_stop": 2, "kl_anneal": 4, "epochs": 10}
    run = train_module.train(Config.from_dict({**SMALL, "validation_size": 50, "early_stop_rule": "authors",
                                               **settings}), tmp_path / "authors", progress=False)
    assert run.summary["epochs"] == _authors_stop_epoch(values, 2, 4, 10)
    plain = train_module.train(Config.from_dict({**SMALL, "validation_size": 50, **settings}),
                               tmp_path / "plain", progress=False)
    if values[0] == -1.0:  # the plain count runs during the warm-up: it stops at epoch 3, the authors' at 6
        assert (plain.summary["epochs"], run.summary["epochs"]) == (3, 6)


# -- 5. The clamped log-variance ------------------------------------------------------------------

def test_clamped_logvar_keeps_q_scale_in_the_authors_range():
    """sigma = exp(hardtanh(raw, -6, 2) / 2): at the bounds e^-3 and e^1 exactly, exp(raw/2) inside, and
    no gradient once raw is outside; softplus (the default) goes past both bounds."""
    lo, hi = (math.exp(b / 2) for b in LOG_VARIANCE_RANGE)
    x = torch.rand(3, 1, 4, 4)
    for scale_kind, inside in (("clamped-logvar", True), ("softplus", False)):
        vae = build_vae((1, 4, 4), hidden=[8], z_dim=2, encoder_scale=scale_kind)
        last = vae.encoder.net[-1]
        for raw, bound in ((40.0, hi), (-40.0, lo)):
            with torch.no_grad():
                last.weight.zero_()
                last.bias.fill_(raw)
            _, scale = vae.encoder(x)
            assert torch.allclose(scale, torch.full_like(scale, bound)) == inside
        if inside:
            last.bias.grad = None
            vae.encoder(x)[1].sum().backward()
            assert torch.equal(last.bias.grad[2:], torch.zeros(2))  # the scale's half, clamped at -40
            with torch.no_grad():
                last.bias.fill_(0.7)
            torch.testing.assert_close(vae.encoder(x)[1], torch.full((3, 2), math.exp(0.35)))


def test_clamped_logvar_reaches_the_vamp_prior_components():
    """The VampPrior's q(z|u_k) uses the same encoder, so its scales are clamped too."""
    vae = build_vae((1, 4, 4), hidden=[8], z_dim=2, prior="vamp", prior_components=3,
                    encoder_scale="clamped-logvar")
    with torch.no_grad():
        vae.encoder.net[-1].bias[2:].fill_(-50.0)
        vae.encoder.net[-1].weight.zero_()
    assert torch.allclose(vae.prior().scale, torch.full((3, 2), math.exp(-3.0)))


@pytest.mark.parametrize("model", [{"model": "m2", "labels": 100}, {"model": "hvae"}])
def test_clamped_logvar_is_refused_where_the_encoder_is_not_the_vaes(model):
    """M2 and the HVAE build their own encoders, which the option would silently not reach."""
    with pytest.raises(InputError, match="applies to the VAE's encoder"):
        check_config(Config.from_dict({**model, "encoder_scale": "clamped-logvar"}))


# -- 6. Pseudo-inputs through Hardtanh(0, 1), started at N(0.05, 0.01^2) --------------------------

def test_hardtanh_pseudo_inputs_stay_in_0_1_and_the_encoder_sees_them_clamped():
    vae = build_vae((1, 4, 4), hidden=[8], z_dim=2, prior="vamp", prior_components=2,
                    pseudo_inputs="hardtanh")
    with torch.no_grad():
        vae.prior.pseudo_inputs[0].fill_(3.0)
        vae.prior.pseudo_inputs[1].fill_(-2.0)
    u = vae.prior.inputs()
    assert u.min() >= 0 and u.max() <= 1
    loc, _ = vae.encoder(torch.stack([torch.ones(1, 4, 4), torch.zeros(1, 4, 4)]))
    torch.testing.assert_close(vae.prior().loc, loc)
    free = build_vae((1, 4, 4), hidden=[8], z_dim=2, prior="vamp", prior_components=2)
    with torch.no_grad():
        free.prior.pseudo_inputs.fill_(3.0)
    assert free.prior.inputs().max() == 3.0  # the default leaves them as they are


def test_prior_init_authors_starts_the_pseudo_inputs_near_0_05(tmp_path, monkeypatch):
    """Through a run's start: the weights' mean 0.05 and std 0.01 within Z standard errors, the
    pseudo-inputs (through the Hardtanh) in [0, 1] with the same mean."""
    seen = {}

    def capture(self):
        prior = self.model.pair.prior
        seen["w"], seen["u"] = prior.pseudo_inputs.detach(), prior.inputs().detach()
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module.Trainer, "run_epoch", capture)
    config = Config.from_dict({**SMALL, "prior": "vamp", "prior_components": 50, "prior_init": "authors",
                               "pseudo_inputs": "hardtanh"})
    with pytest.raises(KeyboardInterrupt):
        train_module.train(config, tmp_path / "run", progress=False)
    mean, std = AUTHORS_INIT
    w, u = seen["w"].double().flatten(), seen["u"].double().flatten()
    n = w.numel()
    assert abs(w.mean() - mean) < Z * std / math.sqrt(n)
    assert abs(w.std() - std) < Z * std / math.sqrt(2 * (n - 1))
    assert u.min() >= 0 and u.max() <= 1 and abs(u.mean() - mean) < Z * std / math.sqrt(n)


# -- settings, presets, old runs ------------------------------------------------------------------

def test_the_options_are_recorded_and_an_older_config_json_reads_as_the_defaults(tmp_path):
    """config.json records every option; a run written before they existed reads with their defaults,
    which are the behaviour it ran with."""
    config, _ = read_config(RUNS / "fm-vae-mc-s1")
    for name, value in ADDED_SETTINGS.items():
        assert getattr(config, name) == value
    out = tmp_path / "run"
    assert main(["train", *[f"--{k.replace('_', '-')}={v}" for k, v in (
        ("dataset", "digits"), ("train-size", 200), ("test-size", 40), ("hidden", 8), ("z-dim", 2),
        ("epochs", 1), ("eval-k", 2), ("validation-size", 50), ("early-stop", 3))],
        "--weight-init", "he", "--optimizer", "adam-normgrad", "--heldout", "authors", "--early-stop-rule",
        "authors", "--encoder-scale", "clamped-logvar", "--out", str(out), "--quiet"]) == 0
    recorded = json.loads((out / "config.json").read_text())
    assert {k: recorded[k] for k in AUTHORS} == AUTHORS


def test_the_plain_presets_are_unchanged_and_the_authors_presets_take_every_option():
    for name in ("fashion-mnist-vae", "fashion-mnist-vampprior", "mnist-vae", "mnist-vampprior"):
        config = Config.from_dict(preset_settings(name))
        assert all(getattr(config, k) == v for k, v in ADDED_SETTINGS.items() if k != "time_budget")
        authors = Config.from_dict(preset_settings(f"{name}-authors"))
        assert {k: getattr(authors, k) for k in AUTHORS} == AUTHORS
        extra = set(AUTHORS) | {"prior_init", "pseudo_inputs"}
        plain, authors_settings = preset_settings(name), preset_settings(f"{name}-authors")
        assert {k: v for k, v in plain.items() if k not in extra} == {
            k: v for k, v in authors_settings.items() if k not in extra}
        assert PRESETS[f"{name}-authors"].published == PRESETS[name].published
    vamp = Config.from_dict(preset_settings("fashion-mnist-vampprior-authors"))
    assert (vamp.prior_init, vamp.pseudo_inputs) == ("authors", "hardtanh")
