"""The semi-supervised VAE (vae.semi): M2's two objectives against their definitions, M1 untouched by
the labels, the class list through a checkpoint, batches that carry the labels, and a few labels
spreading to the unlabelled records on a toy problem."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vae.checkpoint import checkpoint_bytes, load_checkpoint, model_from_checkpoint
from vae.config import SemiConfig, VAEConfig
from vae.semi import M2, SemiVAE, build_model, fit_m2
from vae.train_step import labelled_batches, train_epoch


pytestmark = pytest.mark.usefixtures("one_torch_thread")   # tests/conftest.py


def tiny(classes=(3, 5, 7)) -> SemiVAE:
    return SemiVAE(VAEConfig(input_shape=(6,), latent_dim=2, hidden=(8,),
                             semi=SemiConfig(classes=classes, hidden=(8,), latent_dim=2)))


def test_m2_loss_is_the_labelled_and_the_marginalised_bound():
    m2 = tiny().m2
    z1 = torch.randn(5, 2)
    y = torch.tensor([0, -1, 2, -1, -1])
    neg = m2.neg_elbo_per_class(z1, torch.Generator().manual_seed(1))               # (B, C)
    loss = m2.loss(z1, y, torch.Generator().manual_seed(1))
    log_q = F.log_softmax(m2.logits(z1), -1)
    w = m2.cfg.alpha * 3 / 2                                                          # unlabelled / labelled
    assert torch.allclose(loss[0], neg[0, 0] - w * log_q[0, 0])
    assert torch.allclose(loss[2], neg[2, 2] - w * log_q[2, 2])
    q = log_q.exp()
    entropy = -(q * log_q).sum(-1)
    assert torch.allclose(loss[[1, 3, 4]], (q * neg).sum(-1)[[1, 3, 4]] - entropy[[1, 3, 4]])
    assert neg.shape == (5, 3) and torch.isfinite(neg).all()
    # -log p(y) of the uniform prior is part of the bound: it is at least log C above the Gaussian terms' minimum
    assert (neg > -1e6).all() and math.isclose(math.log(3), math.log(m2.num_classes))


def test_labels_train_m2_and_leave_the_vae_as_it_would_be_without_them():
    model = tiny()
    x = torch.rand(8, 6)
    y = torch.tensor([0, 1, -1, -1, 2, -1, -1, -1])
    grads = []
    for kw in ({}, {"y": y}):
        model.zero_grad()
        model(x, generator=torch.Generator().manual_seed(0), **kw).loss.backward()
        grads.append({n: (p.grad.clone() if p.grad is not None else None) for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        if name.startswith("m2."):
            assert g is None and grads[1][name] is not None and grads[1][name].abs().sum() > 0, name
        else:
            assert torch.equal(g, grads[1][name]), name   # z1 reaches M2 with its gradient stopped


def test_class_list_travels_in_the_checkpoint_and_rebuilds_the_same_predictions():
    model = tiny(classes=("cat", "dog")).eval()
    state = load_checkpoint(checkpoint_bytes(model))
    again = model_from_checkpoint(state)
    assert isinstance(again, SemiVAE) and again.classes == ("cat", "dog")
    raw = torch.rand(4, 6)
    p = again.predict_proba(raw)
    assert p.shape == (4, 2) and torch.allclose(p.sum(-1), torch.ones(4))
    assert torch.equal(p, model.predict_proba(raw))
    assert type(build_model(VAEConfig(input_shape=(6,)))).__name__ == "VAE"


@pytest.mark.parametrize("classes,match", [((1,), "at least 2"), ((1, 1), "distinct"), ((1.5, 2), "ints or strings")])
def test_bad_class_lists_are_refused(classes, match):
    with pytest.raises(ValueError, match=match):
        SemiConfig(classes=classes)


def test_labelled_batches_cover_every_record_and_top_up_with_labels():
    x = torch.arange(20).float()[:, None]
    y = torch.full((20,), -1)
    y[[3, 11]] = torch.tensor([0, 1])
    out = list(labelled_batches(x, y, batch_size=8, labelled_per_batch=4, seed=0, epoch=0))
    assert [len(b[0]) for b in out] == [12, 12, 8]
    seen = torch.cat([b[0][:-4, 0] if len(b[0]) > 4 else b[0][:, 0] for b in out])
    assert sorted(seen.long().tolist()) == list(range(20))                 # each record once per epoch
    for xb, yb in out:
        assert ((yb >= 0) == torch.isin(xb[:, 0].long(), torch.tensor([3, 11]))).all()   # labels follow rows
        assert (yb[-4:] >= 0).all()                                         # the top-up is labelled
    again = list(labelled_batches(x, y, 8, 4, seed=0, epoch=0))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(out, again))        # a pure function of (seed, epoch)


def test_two_labels_per_class_label_two_blobs():
    """Two well separated blobs in z1, two labels each: M2 labels the rest (the unlabelled records
    shape its decision); the batches and train_epoch carry the labels through the whole model."""
    g = torch.Generator().manual_seed(0)
    n = 200
    centres = torch.tensor([[-3.0, 0.0], [3.0, 0.0]])
    truth = torch.arange(2).repeat_interleave(n // 2)
    mu = centres[truth] + torch.randn(n, 2, generator=g)
    y = torch.full((n,), -1)
    for c in range(2):
        y[torch.nonzero(truth == c).flatten()[:2]] = c
    m2 = M2(2, SemiConfig(classes=(0, 1), hidden=(16,), latent_dim=1))
    fit_m2(m2, mu, torch.full((n, 2), -4.0), y, epochs=30, batch_size=32, labelled_per_batch=4, seed=0)
    acc = (m2.logits(mu).argmax(-1) == truth).float().mean()
    assert acc > 0.95
    # the full model takes (records, labels) batches through train_epoch
    model = tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, yy = torch.rand(30, 6), torch.full((30,), -1)
    yy[:3] = torch.tensor([0, 1, 2])
    stats = train_epoch(model, labelled_batches(x, yy, 10, 2, seed=0, epoch=0), opt, beta=1.0)
    assert stats.records == 36 and math.isfinite(stats.neg_elbo)
