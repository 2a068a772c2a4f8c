"""RQ-VAE: rotation trick maths, training lowers the loss, gradients reach the encoder, dead-code reset, I/O."""
import numpy as np
import pytest
import torch

from quant import RQVAE, RQVAEConfig, load_quantizer, metrics as M
from quant.rqvae import RQVAEModel, rotation_trick

from .conftest import planted_clusters

TINY = dict(latent_dim=8, hidden_dims=(32,), batch_size=64, lr=3e-3, log_every=100)


@pytest.fixture(scope="module")
def data():
    return planted_clusters(640, 16, 8, noise=0.5, seed=6)


@pytest.fixture(scope="module")
def trained(data):
    return RQVAE(levels=2, codebook_size=8, epochs=12, seed=0, **TINY).fit(data[0])


def test_rotation_trick_value_and_gradient():
    torch.manual_seed(0)
    e = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    q = torch.randn(5, 4, dtype=torch.float64)
    out = rotation_trick(e, q)
    torch.testing.assert_close(out, q)  # forward value is the codeword
    g = torch.randn(5, 4, dtype=torch.float64)
    (out * g).sum().backward()
    # by hand: d out / d e = (|q|/|e|) R with R = I - 2 r r^T + 2 q_hat e_hat^T
    for i in range(5):
        ei, qi = e[i].detach().numpy(), q[i].numpy()
        eh, qh = ei / np.linalg.norm(ei), qi / np.linalg.norm(qi)
        r = (eh + qh) / np.linalg.norm(eh + qh)
        rot = np.eye(4) - 2 * np.outer(r, r) + 2 * np.outer(qh, eh)
        np.testing.assert_allclose(rot @ eh, qh, atol=1e-12)
        expected = np.linalg.norm(qi) / np.linalg.norm(ei) * rot.T @ g[i].numpy()
        np.testing.assert_allclose(e.grad[i].numpy(), expected, atol=1e-10)


@pytest.mark.parametrize("gradient", ["rotation", "ste"])
def test_gradient_reaches_the_encoder(gradient):
    cfg = RQVAEConfig(levels=2, codebook_size=4, gradient=gradient, **TINY)
    model = RQVAEModel(6, cfg)
    x = torch.randn(32, 6)
    x_hat, codes, cb, commit, _ = model(x)
    ((x_hat - x).pow(2).mean()).backward()  # reconstruction alone: only the quantizer bypass carries it
    assert model.encoder[0].weight.grad.abs().sum() > 0
    assert codes.shape == (32, 2)


def test_training_lowers_loss_and_reconstructs(data, trained):
    x, labels = data
    history = trained.fit_stats["history"]
    assert history[-1]["loss"] < history[0]["loss"]
    codes = trained.encode(x)
    assert codes.shape == (640, 2) and codes.dtype == np.int32
    assert M.rel_mse(x, trained.decode(codes)) < 0.5
    assert M.nmi(codes[:, 0], labels) > 0.6


def test_dead_code_reset_revives_codes(data):
    x, _ = data
    # far-away random codebooks and no k-means start: most codes are dead at first
    common = dict(levels=1, codebook_size=32, epochs=4, seed=0, kmeans_init=False, **TINY)
    with_reset = RQVAE(reset_every=5, **common).fit(x)
    without = RQVAE(reset_every=0, **common).fit(x)
    assert with_reset.fit_stats["resets"] > 0 and without.fit_stats["resets"] == 0
    used_with = M.utilization(with_reset.encode(x), 32)[0]
    used_without = M.utilization(without.encode(x), 32)[0]
    assert used_with > used_without


def test_save_load_round_trip(tmp_path, data, trained):
    x, _ = data
    trained.save(tmp_path / "vae")
    loaded = load_quantizer(tmp_path / "vae")
    assert isinstance(loaded, RQVAE)
    codes = trained.encode(x)
    np.testing.assert_array_equal(loaded.encode(x), codes)
    np.testing.assert_allclose(loaded.decode(codes), trained.decode(codes), rtol=1e-6)


def test_bad_input_and_config(data, trained):
    x, _ = data
    bad = x.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="row 3"):
        RQVAE(levels=1, codebook_size=4, epochs=1, **TINY).fit(bad)
    with pytest.raises(ValueError, match="dimension 3"):
        trained.encode(np.zeros((2, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="gradient"):
        RQVAEConfig(gradient="gumbel")
    with pytest.raises(ValueError, match="epochs"):
        RQVAEConfig(epochs=0)
