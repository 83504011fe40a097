import numpy as np
import pytest

from vaeguard.datasets import list_datasets, load_dataset


def test_thyroid_ships_with_labels():
    bunch = load_dataset("thyroid")
    assert bunch.data.shape == (3772, 6) and bunch.target.shape == (3772,)
    assert int(bunch.target.sum()) == 93 and set(np.unique(bunch.target)) == {0, 1}
    assert bunch.feature_names == ["age", "TSH", "T3", "TT4", "T4U", "FTI"] and "ADBench" in bunch.DESCR
    X, y = load_dataset("thyroid", return_X_y=True, as_frame=True)
    assert list(X.columns) == bunch.feature_names and y.name == "is_anomaly"
    framed = load_dataset("thyroid", as_frame=True)
    assert framed.frame.shape == (3772, 7)
    assert "thyroid" in list_datasets()


def test_unknown_dataset_lists_known():
    with pytest.raises(ValueError, match="known data sets: mitdb_ecg, thyroid, ucr135"):
        load_dataset("iris")


@pytest.mark.parametrize(
    ("name", "steps", "train_end", "first_anomaly"), [("ucr135", 7501, 1200, 4187), ("mitdb_ecg", 7500, 5000, 6936)]
)
def test_series_ship_with_their_training_part(name, steps, train_end, first_anomaly):
    bunch = load_dataset(name)
    assert bunch.data.shape == (steps, 1) and bunch.target.shape == (steps,)
    assert bunch.train_end == train_end and int(np.flatnonzero(bunch.target)[0]) == first_anomaly
    assert bunch.target[:train_end].sum() == 0
    X, y = load_dataset(name, return_X_y=True, as_frame=True)
    assert X.index.name == "timestamp" and list(X.columns) == ["value"] and y.index.equals(X.index)


def test_make_shapes_draws_every_factor_combination_inside_the_canvas():
    import itertools

    from vaeguard.datasets import SHAPES_FACTORS, make_shapes, render_shapes

    grid = np.array(list(itertools.product(*[range(s) for s in SHAPES_FACTORS.values()])))
    images = render_shapes(grid)
    assert images.shape == (len(grid), 32, 32) and set(np.unique(images)) == {0, 1}
    border = np.concatenate([images[:, 0], images[:, -1], images[:, :, 0], images[:, :, -1]], axis=1)
    assert border.sum() == 0  # the largest shape at any angle and position stays inside
    area = images.sum(axis=(1, 2))
    assert area.min() > 10
    scale = grid[:, 1]
    assert area[scale == 5].mean() > 3 * area[scale == 0].mean()  # scale 1 vs 0.5: about 4× the area
    # x and y move the centre of mass by whole pixels in the right direction
    cols = (images.sum(axis=1) * np.arange(32)).sum(axis=1) / area
    rows = (images.sum(axis=2) * np.arange(32)).sum(axis=1) / area
    assert np.corrcoef(cols, grid[:, 3])[0, 1] > 0.95 and np.corrcoef(rows, grid[:, 4])[0, 1] > 0.95
    # the same factors give the same images; different shapes differ
    a, fa = make_shapes(50, random_state=3)
    b, fb = make_shapes(50, random_state=3)
    assert np.array_equal(a, b) and np.array_equal(fa, fb)
    with pytest.raises(ValueError, match="row 0: factor rotation = 10 is outside 0..9"):
        render_shapes(np.array([[0, 0, 10, 0, 0]]))
