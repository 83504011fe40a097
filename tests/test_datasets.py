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
