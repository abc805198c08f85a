"""The semi-supervised M2 (m2.py, discrete.py): the enumerated ELBO is the bound with y summed out by
hand; the score-function estimator is unbiased (value and gradient); the relaxed one tends to the
enumerated bound as the temperature falls; the labelled subset is balanced, seeded and drawn from the
training set; M2 and the classifier beat chance on digits; bad inputs are refused; a resumed run is
bit-identical; Pyro's own SVI trains the model. Statistical checks use fixed seeds and tolerances of a
few standard errors of the quantity compared."""

import math

import pytest
import torch
from torch.nn import functional as F

from pyro_vae.discrete import make_discrete_estimator
from pyro_vae.m2 import UNLABELLED, build_m2

C, Z, X_SHAPE = 3, 2, (1, 4, 4)


def _tiny(discrete="enum", aux_loss=0.0, seed=0, temperature=1.0):
    """A tiny M2 in training mode (3 classes, 4x4 images, z in R^2)."""
    torch.manual_seed(seed)
    m2 = build_m2(X_SHAPE, C, hidden=[8], z_dim=Z, discrete=discrete, aux_loss=aux_loss,
                  temperature=temperature)
    return m2.train()


def _batch(n=6, seed=1):
    """n binary 4x4 images, labels alternating labelled (class i % C) and UNLABELLED."""
    g = torch.Generator().manual_seed(seed)
    x = torch.bernoulli(torch.rand(n, *X_SHAPE, generator=g), generator=g)
    y = torch.tensor([i % C if i % 2 else UNLABELLED for i in range(n)])
    return x, y


def _recording(m2, seen):
    """m2's guide, keeping the z it returns (under enumeration: one draw per class, shape (C, N, Z))."""
    def guide(x, y=None):
        z = m2.guide(x, y)
        seen.append(z)
        return z
    return guide


def _bound_at(m2, x, c, z):
    """log p(x|c,z) + log p(c) + log p(z) - log q(z|x,c) for one image x (C, H, W), class c and code z,
    written out with torch distributions (Bernoulli logits, N(0, I), uniform p(y))."""
    onehot = F.one_hot(torch.tensor(c), C).float()
    logits = m2.decoder(z.unsqueeze(0), onehot.unsqueeze(0))[0]
    loc, scale = m2.encoder(x.unsqueeze(0), onehot.unsqueeze(0))
    return (torch.distributions.Bernoulli(logits=logits).log_prob(x).sum() - math.log(C)
            + torch.distributions.Normal(0.0, 1.0).log_prob(z).sum()
            - torch.distributions.Normal(loc[0], scale[0]).log_prob(z).sum())


def test_the_enumerated_elbo_is_y_summed_out_by_hand():
    """With the z draws the guide made (one per class under enumeration), -loss equals
    sum over labelled n of L(x_n, y_n) + sum over unlabelled n of sum_y q(y|x_n) L(x_n, y) + H(q(y|x_n)),
    each L at the draw of z for its class."""
    m2 = _tiny()
    x, y = _batch()
    seen = []
    loss = make_discrete_estimator("enum").differentiable_loss(m2.model, _recording(m2, seen), x, y)
    (z,) = seen
    assert z.shape == (C, len(x), Z)
    expected = torch.zeros(())
    for n in range(len(x)):
        if y[n] != UNLABELLED:
            expected = expected + _bound_at(m2, x[n], int(y[n]), z[int(y[n]), n])
            continue
        q = F.softmax(m2.classifier(x[n:n + 1])[0], -1)
        expected = expected + sum(q[c] * _bound_at(m2, x[n], c, z[c, n]) for c in range(C))
        expected = expected - (q * q.log()).sum()
    torch.testing.assert_close(loss, -expected, rtol=1e-5, atol=1e-4)


def test_without_labels_every_example_sums_y_out():
    m2 = _tiny(seed=3)
    x, _ = _batch(seed=4)
    seen = []
    loss = make_discrete_estimator("enum").differentiable_loss(m2.model, _recording(m2, seen), x, None)
    (z,) = seen
    expected = torch.zeros(())
    for n in range(len(x)):
        q = F.softmax(m2.classifier(x[n:n + 1])[0], -1)
        expected = expected + sum(q[c] * _bound_at(m2, x[n], c, z[c, n]) for c in range(C))
        expected = expected - (q * q.log()).sum()
    torch.testing.assert_close(loss, -expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("discrete", ["enum", "score"])
def test_labelled_examples_give_the_classifier_no_gradient_without_the_aux_loss(discrete):
    """L(x, y) does not involve q(y|x): a batch of labelled examples leaves the classifier's gradient at
    zero (the masked site's score function once weighted L by q(y|x) over C draws of z, and under
    'score' multiplied it, a noise term in the classifier's gradient); unlabelled ones move it."""
    m2 = _tiny(discrete)
    x, _ = _batch()
    elbo = make_discrete_estimator(discrete)
    params = list(m2.classifier.parameters())
    labelled = torch.arange(len(x)) % C
    grads = torch.autograd.grad(elbo.differentiable_loss(m2.model, m2.guide, x, labelled), params,
                                allow_unused=True)
    assert all(g is None or torch.equal(g, torch.zeros_like(g)) for g in grads)
    unlabelled = torch.full((len(x),), UNLABELLED)
    grads = torch.autograd.grad(elbo.differentiable_loss(m2.model, m2.guide, x, unlabelled), params)
    assert all(g.abs().sum() > 0 for g in grads)


def test_the_aux_loss_adds_alpha_times_the_labels_log_likelihood_under_the_classifier():
    """At the same seed (the same z), loss(alpha) - loss(0) = -alpha * sum_labelled log q(y_n|x_n)."""
    alpha = 50.0
    m2 = _tiny()
    x, y = _batch()
    losses = []
    for a in (0.0, alpha):
        m2.aux_loss = a
        torch.manual_seed(7)
        losses.append(make_discrete_estimator("enum").differentiable_loss(m2.model, m2.guide, x, y))
    labelled = y != UNLABELLED
    log_q = F.log_softmax(m2.classifier(x), -1)[labelled, y[labelled]]
    torch.testing.assert_close(losses[1] - losses[0], -alpha * log_q.sum(), rtol=1e-5, atol=1e-3)
    assert float(-alpha * log_q.sum().detach()) > 1  # the term compared is not negligible
