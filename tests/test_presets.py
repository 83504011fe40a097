import json

import pytest

from vaeguard import VAEAnomalyDetector
from vaeguard.presets import list_presets, load_preset, make_estimator


def test_tabular_preset_spells_out_the_defaults():
    preset = load_preset("tabular")
    defaults = VAEAnomalyDetector().get_params()
    assert all(defaults[k] == v for k, v in preset["params"].items()), "configs/tabular.json drifted from the defaults"


def test_make_estimator_with_overrides():
    det = make_estimator("tabular-fast", random_state=3)
    assert det.epochs == 30 and det.n_importance_samples == 16 and det.random_state == 3
    assert set(list_presets()) >= {"tabular", "tabular-fast"}


def test_bad_presets_are_refused(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown preset 'nope'; known presets: tabular"):
        load_preset("nope")
    (tmp_path / "broken.json").write_text(
        json.dumps({"description": "x", "estimator": "VAEAnomalyDetector", "params": {"latnt_dim": 2}})
    )
    monkeypatch.setattr("vaeguard.presets._config_dir", lambda: tmp_path)
    with pytest.raises(ValueError, match="unknown parameter.*latnt_dim"):
        load_preset("broken")
