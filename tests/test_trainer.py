"""DP-SGD training: the reported ε stays within the target, same seed same model, clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from training.trainer import TrainOptions, predict_proba, train

pytestmark = pytest.mark.filterwarnings("ignore")


def data(n: int = 4000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 4)).astype(np.float32)
    y = (X[:, 0] + 0.5 * X[:, 1] + rng.normal(scale=0.5, size=n) > 0).astype(np.float32)
    return X, y


@pytest.mark.parametrize("mode", ["fused", "ghost", "hooks"])
def test_reported_epsilon_within_target_and_model_learns(mode: str):
    X, y = data()
    r = train(X, y, TrainOptions(epochs=2, target_epsilon=2.0, delta=1e-5, grad_sample_mode=mode, accountant="rdp"))
    assert r.epsilon is not None and 0 < r.epsilon <= 2.0 + 1e-6
    assert r.noise_multiplier and r.noise_multiplier > 0
    p = predict_proba(r, X)
    assert ((p > 0.5) == (y > 0.5)).mean() > 0.75


def test_same_seed_same_model_on_cpu():
    X, y = data()
    opts = TrainOptions(epochs=1, target_epsilon=3.0, seed=11, accountant="rdp", device="cpu")
    assert train(X, y, opts).state_dict == train(X, y, opts).state_dict
    other = TrainOptions(epochs=1, target_epsilon=3.0, seed=12, accountant="rdp", device="cpu")
    assert train(X, y, other).state_dict != train(X, y, opts).state_dict


def test_non_private_baseline_and_sample_weights():
    X, y = data()
    r = train(X, y, TrainOptions(epochs=1, private=False))
    assert r.epsilon is None
    w = np.where(X[:, 2] > 0, 2.0, 0.5)
    rw = train(X, y, TrainOptions(epochs=1, target_epsilon=3.0, accountant="rdp"), sample_weight=w)
    assert rw.epsilon <= 3.0 + 1e-6


def test_bad_inputs():
    X, y = data(100)
    with pytest.raises(ValueError, match="labels must be 0/1"):
        train(X, y * 2, TrainOptions(epochs=1))
    Xn = X.copy()
    Xn[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        train(Xn, y, TrainOptions(epochs=1))
    with pytest.raises(ValueError, match="target ε"):
        TrainOptions(target_epsilon=0)
    with pytest.raises(ValueError, match="n × d"):
        train(X[:, 0], y, TrainOptions(epochs=1))


def test_two_process_data_parallel_training():
    from training.trainer import train_distributed

    X, y = data(3000)
    r = train_distributed(X, y, TrainOptions(epochs=2, target_epsilon=2.0, accountant="rdp"), world_size=2)
    assert 0 < r.epsilon <= 2.0 + 1e-6
    p = predict_proba(r, X)
    assert ((p > 0.5) == (y > 0.5)).mean() > 0.7
