"""EfficientNetRegressor: one and several targets on different scales, R^2, persistence, bad input."""

import pickle

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.metrics import r2_score
from fitted_state import FittedState, assert_pickle_carries_only_the_fitted_state, remeasured_eval_outputs
from synthetic import channel_mix_images

from effsk.estimators import EfficientNetRegressor

SMALL = dict(weights=None, resolution=32, max_epochs=1, batch_size=8, early_stopping=False, random_state=0)


@pytest.fixture(scope="module")
def data():
    X, levels = channel_mix_images(128, seed=0, noise=0)  # flat colours: a from-scratch b0 learns them in 64 steps
    Xt, levels_t = channel_mix_images(40, seed=1, noise=0)
    scales = np.array([1.0, 1000.0, 0.01])
    offsets = np.array([0.0, -5000.0, 3.0])
    return X, levels * scales + offsets, Xt, levels_t * scales + offsets


def test_several_targets_on_different_scales_are_learned(data):
    X, Y, Xt, Yt = data
    reg = EfficientNetRegressor(
        # flat colours carry the same targets at 16 px as at 32; the smaller input trains in about half the time
        weights=None, resolution=16, max_epochs=8, batch_size=16, lr=3e-3, drop_rate=0.0, drop_path_rate=0.0,
        early_stopping=False, random_state=0,
    ).fit(X, Y)
    np.testing.assert_allclose(reg.target_mean_, Y.mean(axis=0))
    np.testing.assert_allclose(reg.target_scale_, Y.std(axis=0))
    pred = reg.predict(Xt)
    assert pred.shape == (40, 3)
    per_target = r2_score(Yt, pred, multioutput="raw_values")
    training_mean = r2_score(Yt, np.tile(Y.mean(axis=0), (len(Yt), 1)), multioutput="raw_values")  # about 0
    assert (per_target > training_mean + 0.5).all(), per_target  # measured 0.73-0.91 (3 seeds x 2 kernels x 1-2 threads)
    assert reg.score(Xt, Yt) == pytest.approx(r2_score(Yt, pred))
    assert reg.history_[-1]["train_loss"] < 0.5  # standardised MSE: predicting the mean scores 1; measured 0.19-0.28


def test_single_target_shape_persistence_and_warm_start(data):
    X, Y, Xt, _ = data
    y = Y[:32, 1]
    reg = EfficientNetRegressor(**SMALL).fit(X[:32], y)
    assert reg.n_outputs_ == 1 and reg.predict(Xt[:5]).shape == (5,)
    restored = pickle.loads(pickle.dumps(reg))
    np.testing.assert_array_equal(restored.predict(Xt), reg.predict(Xt))
    again = clone(reg).fit(X[:32], y)
    np.testing.assert_array_equal(again.predict(Xt), reg.predict(Xt))
    restored.set_params(warm_start=True).fit(X[:32], y)
    assert len(restored.history_) == 2 and restored.target_mean_ == pytest.approx(reg.target_mean_)
    assert not np.array_equal(restored.predict(Xt), reg.predict(Xt))


def test_regressor_bad_input(data):
    X, Y, _, _ = data
    reg = EfficientNetRegressor(**SMALL)
    y = Y[:16, 0].copy()
    y[5] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite targets.*index 5"):
        reg.fit(X[:16], y)
    with pytest.raises(ValueError, match="same length"):
        reg.fit(X[:16], Y[:15])
    with pytest.raises(ValueError, match="numeric"):
        reg.fit(X[:4], ["a", "b", "c", "d"])
    with pytest.raises(ValueError, match="1-D or 2-D"):
        reg.fit(X[:4], np.zeros((4, 2, 2)))


def test_predictions_through_the_folded_copy_match_the_unfolded_model(data):
    X, Y, _, _ = data
    reg = EfficientNetRegressor(**SMALL).fit(X[:32], Y[:32, 1])
    before, pickled = FittedState(reg), pickle.dumps(reg)
    stale = reg.predict(X[:32])
    before.assert_unchanged(reg)
    assert_pickle_carries_only_the_fitted_state(reg, pickled)
    reference = remeasured_eval_outputs(reg, X[:32]).numpy()[:, 0] * reg.target_scale_ + reg.target_mean_
    scale = np.abs(reference - reference.mean()).max()
    assert np.abs(stale - reference).max() > 1e-2 * scale  # the copy follows the edited weights
    np.testing.assert_allclose(reg.predict(X[:32]), reference, rtol=1e-4, atol=1e-4 * scale)  # fp32 vs an fp64 reference
