"""The exemplar prior (exemplar.py): its density against a direct computation of the mixture,
leave-one-out, the exact mixture over all N at test time, gradients into the encoder, and training
with the estimators through the trainer's hand-over of exemplars and batch rows."""

import json
import math
import sys
from contextlib import nullcontext
from pathlib import Path

import pyro
import pytest
import torch
from torch.distributions import Normal

from pyro_vae.cli import main
from pyro_vae.models import exemplar
from pyro_vae.models.exemplar import ExemplarPrior, leave_out, use_training_set
from pyro_vae.models.vae import VAE, build_vae
from pyro_vae.presets import PRESETS
from pyro_vae.training.run_dir import load_model
from pyro_vae.training.train_data import prepare_data

from .conftest import QUICK, assert_log_px_at_least_elbo, run_values
from .test_interruptions import FAST, _assert_same_run

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import exemplar_step_cost  # noqa: E402

N, SHAPE, D = 37, (1, 4, 4), 3


def tiny_vae(subset=None, seed=0, max_elements=exemplar.MAX_ELEMENTS, k=None):
    """A small VAE whose prior is the exemplar prior over N random images."""
    torch.manual_seed(seed)
    vae = build_vae(SHAPE, hidden=(8,), z_dim=D, prior="exemplar", exemplar_subset=subset, exemplar_k=k)
    vae.prior.max_elements = max_elements
    use_training_set(vae, torch.rand(N, *SHAPE, generator=torch.Generator().manual_seed(seed)))
    return vae


def reference(loc, log_variance, z, keep=None, count=None):
    """log of 1/count sum over kept exemplars e of prod_d Normal(z_d; loc_ed, sigma), term by term in
    float64; keep (R, M) says which exemplars row r keeps (default: all), count (R,) defaults to their
    number."""
    sigma = (0.5 * log_variance.double()).exp()
    terms = Normal(loc.double()[None], sigma).log_prob(z.double()[:, None]).sum(-1)  # (R, M)
    if keep is None:
        keep = torch.ones_like(terms, dtype=torch.bool)
    count = keep.sum(-1) if count is None else count
    return terms.masked_fill(~keep, -math.inf).logsumexp(-1) - count.double().log()


def encoded(vae, x):
    with torch.no_grad():
        return vae.encoder(x)[0]


@pytest.mark.parametrize("log_variance", [0.0, math.log(1e-6)])
def test_test_time_density_is_the_mixture_over_all_n_exemplars(monkeypatch, log_variance):
    """Eval mode: all N exemplars (not the training subset), encoded in chunks, the density computed
    in blocks of rows x exemplars; equal to the term-by-term mixture, also for a narrow kernel with z
    next to one exemplar's mean."""
    monkeypatch.setattr(exemplar, "ENCODE_CHUNK", 10)
    vae = tiny_vae(subset=5, max_elements=7).eval()
    with torch.no_grad():
        vae.prior.log_variance.fill_(log_variance)
    loc = encoded(vae, vae.prior.exemplars)
    z = torch.cat([torch.randn(6, D), loc[:5] + 1e-3 * torch.randn(5, D)])
    p = vae.prior()
    assert p.loc.shape == (N, D) and p.batch_shape == ()
    torch.testing.assert_close(p.log_prob(z).double(), reference(loc, vae.prior.log_variance, z),
                               rtol=1e-6, atol=1e-4)


def test_training_leaves_out_exactly_each_examples_own_exemplar():
    """Train mode, all exemplars, rows named: row b's mixture is over the N - 1 others (divided by
    N - 1); at z = its own exemplar's mean with a narrow kernel that term would dominate."""
    vae = tiny_vae().train()
    with torch.no_grad():
        vae.prior.log_variance.fill_(math.log(1e-6))
    rows = torch.tensor([3, 0, N - 1, 3])
    loc = encoded(vae, vae.prior.exemplars)
    z = loc[rows]
    with torch.no_grad(), leave_out(vae, rows):
        got = vae.prior().log_prob(z)
    keep = torch.arange(N)[None] != rows[:, None]
    torch.testing.assert_close(got.double(), reference(loc, vae.prior.log_variance, z, keep), rtol=1e-6,
                               atol=1e-4)
    with torch.no_grad():
        everything = vae.prior().log_prob(z)  # outside the context: nothing left out
    assert vae.prior.left_out is None
    assert (everything - got > 5).all()  # the own exemplar was the one that counted


def test_a_training_subset_divides_by_the_exemplars_each_row_keeps():
    """Train mode with M < N: M distinct exemplars drawn; row b keeps those that are not its own, and the
    mixture is divided by M - 1 where its own was drawn, by M elsewhere."""
    m = 10
    vae = tiny_vae(subset=m).train()
    rows = torch.arange(N)
    with torch.no_grad(), leave_out(vae, rows):
        p = vae.prior()
        z = torch.randn(N, D)
        got = p.log_prob(z)
    assert p.loc.shape == (m, D) and p.index.unique().numel() == m and p.batch_shape == (N,)
    torch.testing.assert_close(p.loc, encoded(vae, vae.prior.exemplars[p.index]))
    keep = p.index[None] != rows[:, None]
    assert sorted(keep.sum(-1).unique().tolist()) == [m - 1, m]
    torch.testing.assert_close(got.double(), reference(p.loc, vae.prior.log_variance, z, keep), rtol=1e-6,
                               atol=1e-4)


def test_a_particle_dimension_broadcasts_against_the_rows_left_out():
    """z of shape (K, B, D) (vectorized particles): each particle of example b leaves out rows[b]."""
    vae = tiny_vae().train()
    rows = torch.tensor([1, 2])
    with torch.no_grad(), leave_out(vae, rows):
        p = vae.prior().expand((4, 2))
        z = torch.randn(4, 2, D)
        got = p.log_prob(z)
    assert got.shape == (4, 2)
    with torch.no_grad(), leave_out(vae, rows):
        one = torch.stack([vae.prior().log_prob(z[k]) for k in range(4)])
    torch.testing.assert_close(got, one)


def test_training_gradients_reach_the_encoder_through_the_prior():
    """Train mode: -log p(z) at a fixed z moves the encoder (the exemplars' means) and the shared
    log-variance, not the decoder. Eval mode: the means are cached without gradient."""
    vae = tiny_vae(subset=20).train()
    z = torch.randn(5, D)
    with leave_out(vae, torch.arange(5)):
        (-vae.prior().log_prob(z).sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in vae.encoder.parameters())
    assert vae.prior.log_variance.grad.abs() > 0
    assert all(p.grad is None for p in vae.decoder.parameters())
    vae.zero_grad(set_to_none=True)
    vae.eval()
    (-vae.prior().log_prob(z).sum()).backward()
    assert all(p.grad is None for p in vae.encoder.parameters()) and vae.prior.log_variance.grad is not None


def test_test_time_means_are_encoded_again_once_a_parameter_changes():
    vae = tiny_vae().eval()
    first = vae.prior.all_means()
    assert vae.prior.all_means() is first  # cached
    param = next(vae.encoder.parameters())
    param.grad = torch.ones_like(param)
    torch.optim.Adam([param], lr=0.1, fused=True).step()  # in place, without bumping the version counter
    again = vae.prior.all_means()
    assert not torch.equal(again, first)
    torch.testing.assert_close(again, encoded(vae, vae.prior.exemplars))


def test_the_prior_needs_its_exemplars_and_a_checkpoint_brings_them_back():
    vae = tiny_vae()
    fresh = build_vae(SHAPE, hidden=(8,), z_dim=D, prior="exemplar")  # as load_model builds it
    with pytest.raises(Exception, match="no exemplars yet"):
        fresh.prior()
    fresh.load_state_dict(vae.state_dict())
    assert torch.equal(fresh.prior.exemplars, vae.prior.exemplars)
    z = torch.randn(4, D)
    torch.testing.assert_close(fresh.eval().prior().log_prob(z), vae.eval().prior().log_prob(z))


def test_the_trainer_leaves_out_the_rows_of_each_batch(tmp_path, monkeypatch):
    """Every training step's prior leaves out exactly the batch's own rows of the training set: the
    model's x (statically binarized, so x is the training set's rows as they are) equals the exemplars
    at those rows; evaluation leaves nothing out."""
    seen = []
    original = VAE.model

    def recording(self, x=None, n=None):
        seen.append((x, self.prior.left_out, self.prior.training))
        return original(self, x, n)

    monkeypatch.setattr(VAE, "model", recording)
    out = tmp_path / "run"
    assert main(["train", "--prior", "exemplar", "--binarize", "static", "--epochs", "2", "--batch-size",
                 "64", "--out", str(out), *QUICK]) == 0
    config, vae = load_model(out)
    exemplars = vae.prior.exemplars
    torch.testing.assert_close(exemplars, prepare_data(config).train_x)
    steps = [(x, rows) for x, rows, training in seen if training]
    assert len(steps) == 2 * math.ceil(400 / 64)
    assert all(rows is not None and torch.equal(x, exemplars[rows]) for x, rows in steps)
    assert torch.cat([rows for _, rows in steps]).sort().values.tolist() == sorted(2 * list(range(400)))
    assert all(rows is None for _, rows, training in seen if not training)


@pytest.mark.parametrize("estimator", [["mc"], ["analytic"], ["iwae", "--particles", "4"]])
def test_trains_with_each_estimator_and_log_px_is_at_least_the_elbo(tmp_path, estimator):
    """mc, analytic (no closed-form KL for the mixture: Monte Carlo on z, recorded in the summary) and
    iwae train; the trained model's log p(x) (exact mixture over all N) is at least its ELBO (paired)."""
    out = tmp_path / estimator[0]
    analytic = estimator[0] == "analytic"
    with pytest.warns(UserWarning, match="no closed-form KL") if analytic else nullcontext():
        assert main(["train", "--prior", "exemplar", "--exemplar-subset", "100", "--estimator", *estimator,
                     "--epochs", "3", "--out", str(out), *QUICK]) == 0
    config, vae = load_model(out)
    assert config.exemplar_subset == 100 and vae.prior.exemplars.shape[0] == 400
    if analytic:
        assert json.loads((out / "summary.json").read_text())["monte_carlo_kl_sites"] == ["z"]
    assert_log_px_at_least_elbo(run_values(out))
    pyro.clear_param_store()



def test_the_exemplar_preset_trains_with_a_validation_split(tmp_path):
    """The preset (protocol + exemplar prior, 25,000 exemplars a step) shortened on digits: the exemplars
    are the training rows left after the validation split, the subset is capped by them."""
    out = tmp_path / "run"
    assert main(["train", "--preset", "fashion-mnist-vae-exemplar", "--dataset", "digits", "--train-size",
                 "300", "--test-size", "40", "--validation-size", "50", "--hidden", "16", "--z-dim", "2",
                 "--epochs", "1", "--eval-k", "5", "--out", str(out), "--quiet"]) == 0
    config, vae = load_model(out)
    assert (config.prior, config.exemplar_subset) == ("exemplar", 25_000)
    assert vae.prior.exemplars.shape[0] == 250


def test_the_step_cost_benchmark_times_each_exemplar_subset_against_the_vampprior(tmp_path, capsys):
    """scripts/exemplar_step_cost.py end to end on digits: one row per subset size beside the VampPrior's,
    each with its paired ratio to the VampPrior measured in the same run, and the test-time pass. No
    timing is asserted."""
    out = exemplar_step_cost.main(["--dataset", "digits", "--train-size", "300", "--subsets", "20", "100",
                                   "--k", "3", "--components", "10", "--hidden", "16", "--z-dim", "2",
                                   "--steps", "2", "--repeats", "2", "--warmup", "1", "--eval-images", "30",
                                   "--json", str(tmp_path / "cost.json")])
    assert list(out["results"]) == ["VampPrior K=10", "exemplar M=20", "exemplar M=100", "exemplar M=20, k=3",
                                    "exemplar M=100, k=3"]
    vamp = out["results"]["VampPrior K=10"]
    assert vamp["ratio_to_vampprior"] == vamp["cpu_ratio_to_vampprior"] == 1.0
    assert all(len(r["s_per_step_all"]) == len(r["cpu_s_per_step_all"]) == 2 and r["ratio_to_vampprior"] > 0
               for r in out["results"].values())
    assert set(out["eval"]) == set(out["results"]) and out["meta"]["exemplars"] == 300
    assert json.loads((tmp_path / "cost.json").read_text())["results"].keys() == out["results"].keys()
    assert "step / VampPrior step" in capsys.readouterr().out


def test_retrieval_keeps_the_union_of_each_examples_k_nearest_and_divides_by_the_whole_set():
    """--exemplar-k with all N exemplars as the subset: E = the union over the batch of each example's
    k nearest exemplars by their means (its own, at distance 0, among them and left out); the mixture
    keeps E's other terms, encoded with gradient, and divides by N - 1."""
    k = 3
    vae = tiny_vae(k=k).train()
    rows = torch.tensor([0, 5, 9, 30])
    means = encoded(vae, vae.prior.exemplars)
    nearest = torch.cdist(means[rows].double(), means.double()).topk(k, largest=False).indices
    with leave_out(vae, rows):
        p = vae.prior()
        z = torch.randn(4, D)
        got = p.log_prob(z)
    kept = set(p.index.tolist())
    assert kept == set(nearest.flatten().tolist()) and set(rows.tolist()) <= kept
    assert p.loc.requires_grad
    keep = p.index[None] != rows[:, None]
    want = reference(p.loc.detach(), vae.prior.log_variance, z, keep, torch.full((4,), N - 1))
    torch.testing.assert_close(got.detach().double(), want, rtol=1e-6, atol=1e-4)


def test_retrieval_means_are_refreshed_once_per_n_examples_and_travel_in_the_state():
    """The cached means: computed whole at the first step, then row by row for the batch and the
    retrieved exemplars, and whole again once N examples have been trained on; a checkpoint carries them."""
    vae = tiny_vae(subset=10, k=2).train()
    rows = torch.arange(8)
    with torch.no_grad(), leave_out(vae, rows):
        vae.prior()
        first = vae.prior.retrieval_means.clone()
        assert int(vae.prior.retrieval_age) == 8
        for p in vae.encoder.parameters():
            p.add_(0.3)  # the encoder moves: the cache is now stale except where re-encoded
        p_z = vae.prior()
        touched = torch.cat([rows, p_z.index]).unique()
        fresh = encoded(vae, vae.prior.exemplars)
        untouched = torch.ones(N, dtype=torch.bool)
        untouched[touched] = False
        torch.testing.assert_close(vae.prior.retrieval_means[touched], fresh[touched])
        assert torch.equal(vae.prior.retrieval_means[untouched], first[untouched])
        for _ in range(3):  # 8 examples a step: 32 >= 37 only after the fifth step
            vae.prior()
        assert int(vae.prior.retrieval_age) == 40
        vae.prior()  # 40 >= 37: refreshed whole, then this step's rows counted
        assert int(vae.prior.retrieval_age) == 8
        torch.testing.assert_close(vae.prior.retrieval_means, fresh)
    again = build_vae(SHAPE, hidden=(8,), z_dim=D, prior="exemplar", exemplar_subset=10, exemplar_k=2)
    again.load_state_dict(vae.state_dict())
    assert torch.equal(again.prior.retrieval_means, vae.prior.retrieval_means)
    assert int(again.prior.retrieval_age) == 8


def test_a_retrieval_run_resumes_from_mid_epoch_bit_identically(tmp_path, crash_copy, monkeypatch):
    """The subset draw, the cached means and their age are in the checkpoint: a run stopped mid-epoch
    (after the cache's whole refresh inside epoch 2) resumes to the run that never stopped."""
    args = ["--prior", "exemplar", "--exemplar-subset", "100", "--exemplar-k", "3", *FAST]
    assert main(["train", "--epochs", "2", "--out", str(tmp_path / "straight"), *args]) == 0
    saved = crash_copy(tmp_path / "crashed", epoch=2, batch=3)
    assert main(["train", "--epochs", "2", "--checkpoint-every", "1e-6", "--out", str(tmp_path / "run"),
                 *args]) == 0
    monkeypatch.undo()
    assert saved == [7 + 3]
    assert main(["train", "--resume", str(tmp_path / "crashed"), "--quiet"]) == 0
    _assert_same_run(tmp_path / "straight", tmp_path / "crashed")


def test_the_hvae_takes_the_exemplar_prior_on_z2(tmp_path, monkeypatch):
    """--model hvae --prior exemplar: p(z2) over the training images through the top encoder q(z2|x);
    each training step leaves out its batch's rows, and log p(x) >= ELBO (paired) at the end. Its two
    presets target the published rows (Exemplar VAE, Table 1)."""
    left = []
    original = ExemplarPrior.forward

    def recording(self):
        if self.training:
            left.append(self.left_out)
        return original(self)

    monkeypatch.setattr(ExemplarPrior, "forward", recording)
    out = tmp_path / "hvae"
    assert main(["train", "--model", "hvae", "--prior", "exemplar", "--exemplar-subset", "100", "--hidden",
                 "16", "--z-dim", "3", "--epochs", "2", "--out", str(out), *QUICK]) == 0
    assert len(left) == 2 * math.ceil(400 / 128) and all(rows is not None for rows in left)
    config, hvae = load_model(out)
    assert isinstance(hvae.prior, ExemplarPrior) and hvae.prior.exemplars.shape[0] == 400
    assert_log_px_at_least_elbo(run_values(out))
    for name, encoder, target in (("fashion-mnist-hvae-exemplar", "gated-mlp", "-226.53 +- 0.09"),
                                  ("fashion-mnist-convhvae-exemplar", "conv", "-224.63 +- 0.06")):
        settings = PRESETS[name].settings
        assert (settings["model"], settings["encoder"], settings["prior"], settings["exemplar_subset"]) == (
            "hvae", encoder, "exemplar", 25_000) and PRESETS[name].published == target
