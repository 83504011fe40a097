import numpy as np
import pytest

from vaeguard.datasets import list_datasets, load_dataset


def test_thyroid_ships_with_labels():
    X, y = load_dataset("thyroid")
    assert X.shape == (3772, 6) and y.shape == (3772,)
    assert int(y.sum()) == 93 and set(np.unique(y)) == {0, 1}
    df, _ = load_dataset("thyroid", as_frame=True)
    assert list(df.columns) == ["age", "TSH", "T3", "TT4", "T4U", "FTI"]
    assert "thyroid" in list_datasets()


def test_unknown_dataset_lists_known():
    with pytest.raises(ValueError, match="known data sets: thyroid"):
        load_dataset("iris")
