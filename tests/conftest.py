import numpy as np
import pyro
import pytest
import torch

from pyro_vae.data import ArrayDataset, Split

# The tests use small tensors, where one thread is fastest and a second only competes with other jobs.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _clean_state():
    """Every test starts from an empty param store, seeded RNGs and Pyro's validation on."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    pyro.enable_validation(True)
    yield
    pyro.clear_param_store()


@pytest.fixture
def float64():
    """The test runs with float64 as the default dtype (exact comparisons); the old default comes back after."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def correlated_linear_gaussian():
    """Factor analysis whose two latents load on nearly the same direction: the exact posterior's correlation
    is about -0.77, so a mean-field guide cannot match it."""
    import math

    from pyro_vae.models import LinearGaussian

    torch.manual_seed(0)
    m = LinearGaussian(LinearGaussian.Config(x_dim=6, latent_dim=2))
    with torch.no_grad():
        w = torch.randn(6, 1)
        m.weight.copy_(torch.cat([w + 0.25 * torch.randn(6, 1), w + 0.25 * torch.randn(6, 1)], 1))
        m.log_psi.fill_(math.log(0.5))
    return m


def prototype_images(n: int, side: int = 8, classes: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Grayscale images near one of a few random prototypes: a dataset a small VAE can learn in seconds."""
    rng = np.random.default_rng(seed)
    protos = rng.uniform(0.05, 0.95, size=(classes, side * side)) > 0.5
    labels = rng.integers(0, classes, size=n)
    probs = np.where(protos[labels], 0.9, 0.1) + rng.normal(0, 0.03, size=(n, side * side))
    images = (np.clip(probs, 0, 1) * 255).astype(np.uint8).reshape(n, side, side)
    return images, labels.astype(np.int64)


@pytest.fixture
def small_data() -> tuple[ArrayDataset, ArrayDataset]:
    images, labels = prototype_images(600)
    return ArrayDataset(images[:500], labels[:500]), ArrayDataset(images[500:], labels[500:])


@pytest.fixture
def fake_dataset(monkeypatch):
    """Register a generated 8x8 dataset under the name 'fake', so CLI runs stay offline and fast."""
    from pyro_vae import data

    def load_fake(root):
        images, labels = prototype_images(700)
        return Split(images[:600], labels[:600]), Split(images[600:], labels[600:])

    monkeypatch.setitem(data.DATASETS, "fake", load_fake)
    return "fake"


SMALL_NET = {"latent_dim": 4, "hidden": [32], "activation": "tanh"}


def write_npz(path, n_train: int, n_test: int):
    """An .npz of prototype images and labels, as `--dataset npz --data-root PATH` reads it."""
    images, labels = prototype_images(n_train + n_test)
    np.savez(path, x_train=images[:n_train], y_train=labels[:n_train], x_test=images[n_train:],
             y_test=labels[n_train:])
    return path
