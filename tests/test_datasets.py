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
    with pytest.raises(ValueError, match="known data sets: thyroid"):
        load_dataset("iris")
