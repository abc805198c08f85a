"""Pyro's own semi-supervised M2 example (examples/vae/ss_vae_M2.py), retyped small, as a reference for
our M2 numbers.

What is kept from Pyro's example (its documented example run: --aux-loss -alm 46 -enum parallel -zd 50
-hl 500 -lr 0.00042 -b1 0.95 -bs 200):
  * model: y ~ OneHotCategorical(uniform), z ~ N(0, I), x ~ Bernoulli(decoder([z, y])); guide:
    y ~ OneHotCategorical(encoder_y(x)) (unlabelled batches only), z ~ N(encoder_z([x, y])); every
    network is Linear-Softplus-Linear (one hidden layer of 500), softmax / exp / sigmoid heads;
  * the ELBO is TraceEnum_ELBO(max_plate_nesting=1) with the guide wrapped in config_enumerate(parallel);
  * the aux loss is a second SVI (Trace_ELBO) on model_classify, the classifier's log-likelihood of the
    labels scaled by aux_loss_multiplier, stepped on every batch with the same Adam;
  * each epoch walks all unlabelled batches, with a labelled batch at every i where
    i % int(n_train / n_labels) == 1 until the labelled batches run out (so with 100 labels and batch
    200, one labelled step per epoch);
  * pixel intensities in [0, 1] are the Bernoulli targets (no binarization).
What differs: Fashion-MNIST from pyro_vae's loader; the labelled subset is
pyro_vae.inference.discrete.choose_labelled
(balanced, as theirs); the unlabelled pool is all 60k training images (theirs holds out the last 10k for
validation and drops the labelled images from the pool); no validation accuracy, test accuracy only.
"""

import argparse
import time

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO, TraceEnum_ELBO, config_enumerate
from pyro.optim import Adam
from torch import nn

from pyro_vae.data import load_dataset
from pyro_vae.inference.discrete import choose_labelled


def mlp(sizes_in: int, hidden: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(sizes_in, hidden), nn.Softplus(), nn.Linear(hidden, out))


def concat(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Concatenate on the last dim, broadcasting the leading dims (enumeration adds one to y)."""
    shape = torch.broadcast_shapes(a.shape[:-1], b.shape[:-1])
    return torch.cat([a.expand(*shape, a.shape[-1]), b.expand(*shape, b.shape[-1])], dim=-1)


class SSVAE(nn.Module):
    def __init__(self, x_dim=784, y_dim=10, z_dim=50, hidden=500, aux_loss_multiplier=46.0):
        super().__init__()
        self.y_dim, self.z_dim, self.aux = y_dim, z_dim, aux_loss_multiplier
        self.encoder_y = mlp(x_dim, hidden, y_dim)
        self.encoder_z = mlp(x_dim + y_dim, hidden, 2 * z_dim)
        self.decoder = mlp(z_dim + y_dim, hidden, x_dim)

    def model(self, xs, ys=None):
        pyro.module("ss_vae", self)
        n = xs.shape[0]
        with pyro.plate("data", n):
            zs = pyro.sample("z", dist.Normal(xs.new_zeros(n, self.z_dim), 1.0).to_event(1))
            ys = pyro.sample("y", dist.OneHotCategorical(xs.new_full((n, self.y_dim), 1.0 / self.y_dim)),
                             obs=ys)
            probs = torch.sigmoid(self.decoder(concat(zs, ys)))
            # grey levels as Bernoulli targets, as theirs (written before Pyro validated the support)
            pyro.sample("x", dist.Bernoulli(probs, validate_args=False).to_event(1), obs=xs)

    def guide(self, xs, ys=None):
        with pyro.plate("data", xs.shape[0]):
            if ys is None:
                ys = pyro.sample("y", dist.OneHotCategorical(torch.softmax(self.encoder_y(xs), -1)))
            loc, log_scale = self.encoder_z(concat(xs, ys)).chunk(2, dim=-1)
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))

    def model_classify(self, xs, ys=None):
        pyro.module("ss_vae", self)
        if ys is None:
            return
        with pyro.plate("data", xs.shape[0]), pyro.poutine.scale(scale=self.aux):
            pyro.sample("y_aux", dist.OneHotCategorical(torch.softmax(self.encoder_y(xs), -1)), obs=ys)

    def guide_classify(self, xs, ys=None):
        pass


def batches(x, y, batch_size, generator):
    order = torch.randperm(len(x), generator=generator)
    for i in range(0, len(x), batch_size):
        idx = order[i:i + batch_size]
        yield x[idx], (None if y is None else y[idx])


@torch.no_grad()
def accuracy(vae, x, y):
    return (vae.encoder_y(x).argmax(-1) == y).float().mean().item()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--labels", type=int, default=100)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--aux-loss", type=float, default=46.0, help="aux_loss_multiplier (theirs: 46)")
    p.add_argument("--lr", type=float, default=0.00042)
    p.add_argument("--beta1", type=float, default=0.95)
    p.add_argument("--batch-size", type=int, default=200)
    p.add_argument("--hidden", type=int, default=500)
    p.add_argument("--z-dim", type=int, default=50)
    args = p.parse_args()

    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()
    d = load_dataset("fashion-mnist", args.data_dir)
    train_x = d.train_x.reshape(len(d.train_x), -1).float()
    test_x = d.test_x.reshape(len(d.test_x), -1).float()
    n_classes = int(d.train_y.max()) + 1
    labelled = choose_labelled(d.train_y, args.labels, args.seed)
    sup_x = train_x[labelled]
    sup_y = nn.functional.one_hot(d.train_y[labelled].long(), n_classes).float()

    vae = SSVAE(train_x.shape[1], n_classes, args.z_dim, args.hidden, args.aux_loss)
    optim = Adam({"lr": args.lr, "betas": (args.beta1, 0.999)})
    guide = config_enumerate(vae.guide, "parallel")
    losses = [SVI(vae.model, guide, optim, loss=TraceEnum_ELBO(max_plate_nesting=1)),
              SVI(vae.model_classify, vae.guide_classify, optim, loss=Trace_ELBO())]

    interval = int(len(train_x) / args.labels)
    generator = torch.Generator().manual_seed(args.seed)
    print(f"labels {args.labels} batch {args.batch_size} lr {args.lr} beta1 {args.beta1} "
          f"aux {args.aux_loss} seed {args.seed}; a labelled batch at i % {interval} == 1", flush=True)
    acc = float("nan")
    for epoch in range(1, args.epochs + 1):
        start = time.time()
        sup_iter = batches(sup_x, sup_y, args.batch_size, generator)
        unsup_iter = batches(train_x, None, args.batch_size, generator)
        n_sup = -(-len(sup_x) // args.batch_size)
        n_unsup = -(-len(train_x) // args.batch_size)
        done_sup, totals = 0, [0.0, 0.0]
        for i in range(n_sup + n_unsup):
            supervised = i % interval == 1 and done_sup < n_sup
            xs, ys = next(sup_iter) if supervised else next(unsup_iter)
            done_sup += supervised
            for k, svi in enumerate(losses):
                totals[k] += svi.step(xs, ys)
        seconds = time.time() - start
        acc = accuracy(vae, test_x, d.test_y)
        print(f"epoch {epoch} test_acc {acc:.4f} sec {seconds:.1f} "
              f"elbo_loss/ex {totals[0] / len(train_x):.2f} aux_loss {totals[1]:.2f}", flush=True)
    print(f"final seed {args.seed} labels {args.labels} epochs {args.epochs} test_acc {acc:.4f}", flush=True)


if __name__ == "__main__":
    main()
