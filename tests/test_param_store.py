"""Pyro's param store round trip: a model of ours trained with pyro.infer.SVI, the store saved with
pyro.get_param_store().save(path), then in a fresh Python process the same model built (another
initialization) and the store loaded: the first model/guide call copies the loaded values into the
model's own parameters (in place), so evaluation, one more SVI step and our own step (no param
sites) all start from the trained values. And the protection kept: a tensor of another live model
with the same names is replaced (with one warning), never shared; a stored value of another shape
is replaced with one warning; the tensors a model now gone left in the store are not loaded.

Run as `python -m tests.test_param_store DIR`, this module is the fresh process: it loads each
DIR/<case>.pt the tests saved and writes what it measured to DIR/child.json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pyro
import pytest
import torch

from pyro_vae.data import binarize, load_dataset
from pyro_vae.inference.discrete import choose_labelled, make_discrete_estimator, mask_labels
from pyro_vae.inference.estimators import make_estimator
from pyro_vae.models.m2 import build_m2
from pyro_vae.models.vae import build_vae
from pyro_vae.param_store import param_sites

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"hidden": [32], "z_dim": 4}
CASES = {  # name: (builder, options): every prior, a learned likelihood scale, the guides with parameters
    "vae": ("vae", {}),
    "vamp": ("vae", {"prior": "vamp", "prior_components": 3}),
    "mog-laplace-learned": ("vae", {"prior": "mog", "prior_components": 3, "likelihood": "laplace-learned"}),
    "learned-gaussian-learned": ("vae", {"prior": "learned", "likelihood": "gaussian-learned"}),
    "iaf": ("vae", {"guide": "iaf"}),
    "lowrank": ("vae", {"guide": "lowrank"}),
    "ae": ("vae", {"model": "ae"}),
    "m2": ("m2", {}),
    "m2-score-aux": ("m2", {"discrete": "score", "aux_loss": 10.0}),
    "classifier": ("m2", {"model": "classifier"}),
}
LR = 1e-2
REL = 1e-5  # a loss recomputed in another process from the same values and seed (summation order aside)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    """256 binarized digits and their labels, 60 of them kept (the rest UNLABELLED)."""
    data = load_dataset("digits")
    x = binarize(data.train_x[:256], torch.Generator().manual_seed(0))
    y = data.train_y[:256]
    return x, mask_labels(y, choose_labelled(y, 60, seed=0))


def _build(case: str, seed: int):
    """The model of `case`, its parameters drawn with torch seed `seed`."""
    builder, options = CASES[case]
    torch.manual_seed(seed)
    x_shape = (1, 8, 8)
    if builder == "vae":
        return build_vae(x_shape, **SMALL, **options)
    return build_m2(x_shape, 10, **SMALL, **options).train()


def _estimator(model):
    return make_estimator("mc") if hasattr(model, "family") else make_discrete_estimator(
        getattr(model, "discrete", "enum"))


def _args(model, x, y):
    return (x,) if hasattr(model, "family") else (x, y)


def _loss(model, x, y, sites: bool = True) -> float:
    """-ELBO on (x, y), seeded; `sites=False` as our own training step runs it (no param sites)."""
    pyro.set_rng_seed(1)
    with param_sites(sites):
        return float(_estimator(model).loss(model.model, model.guide, *_args(model, x, y)))


def _svi(model, steps: int, x, y, seed: int = 0) -> pyro.infer.SVI:
    """`steps` SVI steps with pyro.optim.Adam (learning rate LR) on minibatches of 64."""
    pyro.set_rng_seed(seed)
    svi = pyro.infer.SVI(model.model, model.guide, pyro.optim.Adam({"lr": LR}), loss=_estimator(model))
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(x), (64,), generator=gen)
        svi.step(*_args(model, x[idx], y[idx]))
    return svi


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _moved(model, before) -> set[str]:
    return {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}


def _store_is(model) -> bool:
    """The store holds exactly the model's own trainable tensors."""
    store = {id(p) for _, p in pyro.get_param_store().named_parameters()}
    return store == {id(p) for p in model.parameters() if p.requires_grad}


def _child(folder: Path) -> None:
    """The fresh process: per case, build the model anew (seed 1, not the parent's 0), load the saved
    store, and record what the first call, our own step, Pyro's pyro.module recipe and one SVI step
    see."""
    x, y = _data()
    results = {}
    for case in CASES:
        path = folder / f"{case}.pt"
        store = pyro.get_param_store()
        store.clear()
        model = _build(case, seed=1)
        fresh = _loss(model, x, y, sites=False)  # this initialization's loss; the store stays empty
        tensors = [id(p) for p in model.parameters()]
        store.load(str(path))
        saved = torch.load(path, weights_only=False)["params"]
        loaded = _loss(model, x, y)  # the first calls after load
        prefix = model.param_prefix
        equal_saved = all(torch.equal(p, saved[f"{prefix}$$${n}"]) for n, p in model.named_parameters())
        same_objects = [id(p) for p in model.parameters()] == tensors  # copied in place
        before = _snapshot(model)
        _svi(model, 1, x, y, seed=3)
        moved = sorted(_moved(model, before))
        from_saved = max(float((p - saved[f"{prefix}$$${n}"]).abs().max())
                         for n, p in model.named_parameters())
        results[case] = {"fresh": fresh, "loaded": loaded, "equal_saved": equal_saved,
                         "same_objects": same_objects, "moved": moved, "names": sorted(before),
                         "from_saved": from_saved, "store_is_model": _store_is(model)}
        for key, seed in (("own_step", 2), ("pyro_module", 4)):  # another fresh model each
            store.clear()
            model = _build(case, seed=seed)
            store.load(str(path))
            if key == "pyro_module":  # Pyro's documented recipe for a module after load
                pyro.module(prefix, model, update_module_params=True)
            results[case][key] = _loss(model, x, y, sites=key != "own_step")
    (folder / "child.json").write_text(json.dumps(results))


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory):
    """Per case: the untrained and trained losses here, and what a fresh process measured after
    loading the store this process saved (see _child)."""
    folder = tmp_path_factory.mktemp("param_store")
    x, y = _data()
    expected = {}
    for case in CASES:
        pyro.clear_param_store()
        model = _build(case, seed=0)
        untrained = _loss(model, x, y)
        _svi(model, 30, x, y)
        expected[case] = {"untrained": untrained, "trained": _loss(model, x, y)}
        assert _store_is(model)
        pyro.get_param_store().save(str(folder / f"{case}.pt"))
    pyro.clear_param_store()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "tests.test_param_store", str(folder)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return expected, json.loads((folder / "child.json").read_text())


@pytest.mark.parametrize("case", list(CASES))
def test_a_saved_param_store_loads_into_the_same_model_built_in_a_fresh_process(case, round_trip):
    expected, measured = (r[case] for r in round_trip)
    trained, tol = expected["trained"], REL * abs(expected["trained"])
    # the check can fail: training moved the loss, and the fresh model's is its own
    assert abs(expected["untrained"] - trained) > 100 * tol
    assert abs(measured["fresh"] - trained) > 100 * tol
    assert measured["loaded"] == pytest.approx(trained, abs=tol)
    assert measured["equal_saved"] and measured["same_objects"]
    assert measured["own_step"] == pytest.approx(trained, abs=tol)  # no param sites: still adopted
    assert measured["pyro_module"] == pytest.approx(trained, abs=tol)


@pytest.mark.parametrize("case", list(CASES))
def test_one_svi_step_after_loading_steps_the_models_own_parameters_from_the_loaded_values(case, round_trip):
    """Adam's first step moves each element by at most its learning rate (|m/sqrt(v)| = 1), so every
    parameter ends within LR of the value loaded (a fresh initialization is much farther)."""
    _, measured = (r[case] for r in round_trip)
    assert measured["moved"] == measured["names"]
    assert measured["from_saved"] <= LR * (1 + 1e-4)
    assert measured["store_is_model"]


def test_two_live_models_with_the_same_names_train_their_own_tensors_and_the_second_warns_once():
    """SVI on a second model built with the same names replaces the first one's tensors in the store
    (it must not step them), with one warning; the first stays as it was, and steps again its own."""
    x, y = _data()
    first = _build("vae", seed=0)
    _svi(first, 3, x, y)
    kept = _snapshot(first)
    second = _build("vae", seed=1)
    fresh = _snapshot(second)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _svi(second, 3, x, y)
    assert not _moved(first, kept)
    assert _moved(second, fresh) == set(fresh)
    assert _store_is(second)
    mine = [w for w in caught if "param store" in str(w.message)]
    assert len(mine) == 1 and "\n" not in str(mine[0].message), [str(w.message) for w in caught]
    assert "another live model" in str(mine[0].message)
    moved_back = _snapshot(second)
    with warnings.catch_warnings(record=True) as caught:  # and back: the first replaces the second's
        warnings.simplefilter("always")
        _svi(first, 3, x, y)
    assert len([w for w in caught if "param store" in str(w.message)]) == 1
    assert _moved(first, kept) == set(kept) and not _moved(second, moved_back)
    assert _store_is(first)


def test_a_stored_value_of_another_shape_is_replaced_with_one_warning_and_the_rest_is_loaded():
    x, y = _data()
    vae = _build("vae", seed=0)
    own = _snapshot(vae)
    pyro.param("vae$$$encoder.net.0.weight", torch.zeros(5, 64))  # shape (32, 64) in this model
    pyro.param("vae$$$encoder.net.0.bias", torch.full((32,), 0.5))  # a value set with pyro.param
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _loss(vae, x, y)
        _loss(vae, x, y)
    messages = [str(w.message) for w in caught if "param store" in str(w.message)]
    assert len(messages) == 1 and "\n" not in messages[0], messages
    assert "vae$$$encoder.net.0.weight (5, 64) -> (32, 64)" in messages[0]
    assert torch.equal(vae.encoder.net[0].weight, own["encoder.net.0.weight"])  # kept its own
    assert torch.equal(vae.encoder.net[0].bias, torch.full((32,), 0.5))  # loaded
    assert _store_is(vae)


def test_the_tensors_of_a_model_now_gone_are_not_loaded_into_a_new_one():
    """A model of ours leaves its tensors in the store when it goes; a new model with the same names
    (a checkpoint just loaded into it, say) keeps its own values, without a warning, even while the
    old one, caught in a reference cycle, still waits for the garbage collector."""
    x, y = _data()
    old = _build("vae", seed=0)
    _svi(old, 3, x, y)
    old.cycle = [old]
    del old
    new = _build("vae", seed=1)
    own = _snapshot(new)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _loss(new, x, y)
    assert not _moved(new, own)
    assert _store_is(new)


def test_a_live_models_tensors_put_in_the_store_by_pyro_module_are_not_loaded_into_another():
    """pyro.module("vae", first) puts the live first model's tensors under the names a second VAE
    uses: the second replaces them (one warning) and keeps its own values."""
    x, y = _data()
    first = _build("vae", seed=0)
    pyro.module("vae", first)
    second = _build("vae", seed=1)
    own = _snapshot(second)
    with pytest.warns(UserWarning, match="another live model"):
        _loss(second, x, y)
    assert not _moved(second, own)
    assert _store_is(second)


if __name__ == "__main__":
    _child(Path(sys.argv[1]))
