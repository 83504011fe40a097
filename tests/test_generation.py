"""Generation and resynthesis: inverse_transform, slerp paths, traversals, attribute vectors, aggregate sampling."""

import numpy as np
import pandas as pd
import pytest

from vaeguard import VAEAnomalyDetector, load
from vaeguard.datasets import make_shapes
from vaeguard.generation import AggregatePosterior, slerp


@pytest.fixture(scope="module")
def table():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(500, 2)) @ rng.normal(size=(2, 6)) + 0.1 * rng.normal(size=(500, 6))
    return X, VAEAnomalyDetector(epochs=30, latent_dim=3, n_models=1, random_state=0).fit(X)


def test_inverse_transform_of_the_codes_is_the_reconstruction(table):
    X, det = table
    np.testing.assert_allclose(det.inverse_transform(det.transform(X[:20])), det.reconstruct(X[:20]), atol=1e-10)
    with pytest.raises(ValueError, match=r"codes must have shape \(n, 3\)"):
        det.inverse_transform(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="code 1, dimension 0 is nan"):
        det.inverse_transform(np.array([[0, 0, 0], [np.nan, 0, 0]]))


def test_slerp_follows_the_great_circle_and_interpolates_norms():
    a, b = np.array([2.0, 0.0, 0.0]), np.array([0.0, 4.0, 0.0])
    path = slerp(a, b, np.linspace(0, 1, 5))
    np.testing.assert_allclose(path[0], a) and np.testing.assert_allclose(path[-1], b)
    np.testing.assert_allclose(np.linalg.norm(path, axis=1), [2.0, 2.5, 3.0, 3.5, 4.0])
    np.testing.assert_allclose(path[2] / 3.0, [np.sqrt(0.5), np.sqrt(0.5), 0.0])  # halfway along the arc
    np.testing.assert_allclose(slerp(a, 2 * a, np.array([0.5])), [1.5 * a])  # parallel: the straight line


def test_interpolate_runs_from_one_sample_to_the_other(table):
    X, det = table
    for method in ("slerp", "linear"):
        path = det.interpolate(X[0], X[1], steps=6, method=method)
        assert path.shape == (6, 6)
        np.testing.assert_allclose(path[0], det.reconstruct(X[:1])[0], atol=1e-10)
        np.testing.assert_allclose(path[-1], det.reconstruct(X[1:2])[0], atol=1e-10)
    z = det.transform(X[:2])
    middle = det.interpolate(X[:1], X[1:2], steps=3, method="linear")[1]
    np.testing.assert_allclose(middle, det.inverse_transform(z.mean(axis=0, keepdims=True))[0], atol=1e-10)
    with pytest.raises(ValueError, match="x_a must be one sample, got 2"):
        det.interpolate(X[:2], X[2])
    with pytest.raises(ValueError, match="steps must be an integer ≥ 2"):
        det.interpolate(X[0], X[1], steps=1)


def test_traverse_moves_one_dimension(table):
    X, det = table
    values = [-2.0, 0.0, 2.0]
    out = det.traverse(X[3], dim=1, values=values)
    codes = np.repeat(det.transform(X[3:4]), 3, axis=0)
    codes[:, 1] = values
    np.testing.assert_allclose(out, det.inverse_transform(codes))
    with pytest.raises(ValueError, match=r"dim must be an integer in \[0, 2\]"):
        det.traverse(X[3], dim=3)


def test_attribute_vectors_and_resynthesis(table):
    X, det = table
    labels = X[:, 0] > np.median(X[:, 0])
    vector = det.attribute_vector(X, labels)
    z = det.transform(X)
    np.testing.assert_allclose(vector, z[labels].mean(0) - z[~labels].mean(0))
    np.testing.assert_allclose(det.resynthesize(X[:5], vector, alpha=0.0), det.reconstruct(X[:5]), atol=1e-10)
    # moving the codes of the "without" group by the vector moves their column 0 towards the "with" group
    moved = det.resynthesize(X[~labels], vector, alpha=1.0)
    assert moved[:, 0].mean() > det.reconstruct(X[~labels])[:, 0].mean() + 0.5 * (
        X[labels, 0].mean() - X[~labels, 0].mean()
    )
    with pytest.raises(ValueError, match="some samples True and some False"):
        det.attribute_vector(X, np.ones(len(X), bool))
    with pytest.raises(ValueError, match="labels must be 500 booleans"):
        det.attribute_vector(X, labels[:10])


def test_aggregate_posterior_recovers_a_known_mixture():
    rng = np.random.default_rng(0)
    codes = np.concatenate([rng.normal(-3, 0.5, size=(3000, 2)), rng.normal(3, 0.5, size=(1000, 2))])
    mix = AggregatePosterior.fit(codes, random_state=0)
    draws = mix.sample(20_000, np.random.default_rng(1))
    assert abs((draws[:, 0] > 0).mean() - 0.25) < 0.02  # the weights
    np.testing.assert_allclose(draws[draws[:, 0] > 0].mean(0), [3, 3], atol=0.05)
    assert abs(draws[draws[:, 0] < 0].std(0) - 0.5).max() < 0.05


def test_aggregate_samples_avoid_the_gap_between_clusters():
    """Two tight clusters: the prior also decodes codes between them (rows on no cluster); the aggregate fewer."""
    rng = np.random.default_rng(0)
    sign = rng.choice([-1.0, 1.0], size=(800, 1))
    X = 3.0 * sign + 0.1 * rng.normal(size=(800, 4))
    det = VAEAnomalyDetector(epochs=60, latent_dim=2, n_models=1, random_state=0).fit(X)

    def off_cluster(samples):
        return (np.abs(np.abs(samples).mean(axis=1) - 3.0) > 0.5).mean()

    prior = off_cluster(det.sample(2000, random_state=0, source="prior"))
    aggregate = off_cluster(det.sample(2000, random_state=0, source="aggregate"))
    assert aggregate < 0.5 * prior


def test_the_aggregate_posterior_is_fitted_on_first_use_to_the_training_codes(monkeypatch, tmp_path):
    # a fit that only detects never fits it (3 s of a 20 000-row table's fit); sampling from it, or saving, does,
    # once, to the same codes and seed as a fit that made it at once
    import vaeguard.generation as generation
    from vaeguard.estimators import latent_usage

    fits = []
    real = generation.AggregatePosterior.fit.__func__

    def counting(cls, codes, random_state):
        fits.append(len(codes))
        return real(cls, codes, random_state)

    monkeypatch.setattr(generation.AggregatePosterior, "fit", classmethod(counting))
    X = np.random.default_rng(0).normal(size=(300, 4))
    det = VAEAnomalyDetector(epochs=5, latent_dim=2, n_models=1, random_state=0).fit(X)
    det.score_samples(X[:10])
    assert fits == []
    drawn = det.sample(5, random_state=0, source="aggregate")
    assert fits == [300]
    inputs = det.to_model_space(X)
    codes = latent_usage(det.model_, inputs.x, inputs.mask, det.score_seed_)[2]
    eager = real(generation.AggregatePosterior, codes, det.score_seed_)
    np.testing.assert_allclose(det.aggregate_posterior_.means, eager.means, rtol=1e-9)
    det.save(tmp_path / "m.h5")
    assert fits == [300]  # saving reuses the one it has
    np.testing.assert_array_equal(load(tmp_path / "m.h5").sample(5, random_state=0, source="aggregate"), drawn)
    fresh = VAEAnomalyDetector(epochs=5, latent_dim=2, n_models=1, random_state=0).fit(X)
    fresh.save(tmp_path / "fresh.h5")  # never sampled: the file still carries it
    assert fits == [300, 300]
    np.testing.assert_array_equal(load(tmp_path / "fresh.h5").sample(5, random_state=0, source="aggregate"), drawn)
    assert getattr(VAEAnomalyDetector(), "aggregate_posterior_", None) is None


def test_aggregate_sampling_of_images_survives_save(tmp_path):
    images, _ = make_shapes(300, image_size=16, random_state=0)
    det = VAEAnomalyDetector(epochs=3, latent_dim=4, random_state=0).fit(images)
    out = det.sample(6, random_state=0, source="aggregate")
    assert out.shape == (6, 16, 16) and out.dtype == np.uint8
    det.save(tmp_path / "m.h5")
    back = load(tmp_path / "m.h5")
    np.testing.assert_array_equal(back.sample(6, random_state=0, source="aggregate"), out)
    with pytest.raises(ValueError, match="source must be 'prior' or 'aggregate'"):
        det.sample(2, source="posterior")


def test_sampled_lattice_values_read_as_the_data_does():
    # issue 19: a price on a 0.01 grid came back as 13.929999999999938, a count as 4.0
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(
        {
            "count": rng.poisson(5, 800),
            "price": np.round(rng.normal(13, 2, 800), 2),
            "half": np.round(rng.normal(5, 1, 800) * 2) / 2,
            "x": rng.normal(size=800),
        }
    )
    det = VAEAnomalyDetector(random_state=0, epochs=5).fit(frame)
    assert list(det.column_types_["kind"]) == ["lattice", "lattice", "lattice", "continuous"]
    for out in (det.sample(300, random_state=1), det.reconstruct(frame[:50]), det.inverse_transform(np.zeros((5, 2)))):
        assert out["count"].dtype == np.int64 and out["half"].dtype == np.float64
        assert all(len(repr(v).split(".")[1]) <= 2 for v in out["price"]), out["price"].tolist()[:10]
        assert set(out["half"] * 2 % 1) == {0.0}
    arrays = VAEAnomalyDetector(random_state=0, epochs=5, latent_dim=2).fit(frame.to_numpy(dtype=float))
    values = arrays.sample(100, random_state=1)[
        :, 1
    ].tolist()  # no names: one float array, values on the grid as written
    assert all(len(repr(v).split(".")[1]) <= 2 for v in values)
