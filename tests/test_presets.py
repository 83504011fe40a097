import numpy as np
import pytest

from vaeguard import VAEAnomalyDetector, VAETimeSeriesDetector
from vaeguard.presets import list_presets, read_preset


def test_tabular_preset_spells_out_the_defaults():
    preset = read_preset("tabular")
    defaults = VAEAnomalyDetector().get_params()
    assert all(defaults[k] == v for k, v in preset["params"].items()), "configs/tabular.toml drifted from the defaults"
    assert VAEAnomalyDetector.from_config("tabular").get_params() == defaults


def test_timeseries_preset_spells_out_its_defaults_and_belongs_to_its_estimator():
    defaults = VAETimeSeriesDetector().get_params()
    assert VAETimeSeriesDetector.from_config("timeseries").get_params() == defaults
    assert VAETimeSeriesDetector.from_config("timeseries", window=100).window == 100
    with pytest.raises(ValueError, match="preset 'timeseries' is for VAETimeSeriesDetector, not VAEAnomalyDetector"):
        VAEAnomalyDetector.from_config("timeseries")
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) latent_dim .*allowed: contamination"):
        VAETimeSeriesDetector.from_config("timeseries", latent_dim=3)


def test_image_preset_is_what_the_defaults_pick_for_images():
    from sklearn.datasets import load_digits

    images = load_digits().images[:60]
    quick = {"epochs": 1, "n_importance_samples": 2, "random_state": 0}
    from_preset = VAEAnomalyDetector.from_config("image", **quick).fit(images)
    default = VAEAnomalyDetector(**quick).fit(images)
    assert from_preset.model_spec_ == default.model_spec_
    assert from_preset.model_spec_["encoder"] == "mlp"  # 8 × 8: below 16 × 16, the MLP
    # the same training (batch, learning rate, trimming) gives the same weights, so the same scores
    np.testing.assert_array_equal(from_preset.score_samples(images), default.score_samples(images))


def test_from_config_with_overrides_and_a_file(tmp_path):
    det = VAEAnomalyDetector.from_config("tabular-fast", random_state=3)
    assert det.epochs == 30 and det.n_importance_samples == 16 and det.random_state == 3
    assert set(list_presets()) == {"image", "tabular", "tabular-fast", "timeseries"}
    path = tmp_path / "mine.toml"
    path.write_text('estimator = "VAEAnomalyDetector"\n[params]\nlatent_dim = 3\n')
    assert VAEAnomalyDetector.from_config(path).latent_dim == 3


def test_bad_presets_are_refused(tmp_path):
    with pytest.raises(
        ValueError, match="unknown preset .nope.; known presets: image, tabular, tabular-fast, timeseries"
    ):
        VAEAnomalyDetector.from_config("nope")
    bad_param = tmp_path / "p.toml"
    bad_param.write_text("[params]\nlatnt_dim = 2\n")
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) latnt_dim .*allowed: .*latent_dim"):
        VAEAnomalyDetector.from_config(bad_param)
    bad_key = tmp_path / "k.toml"
    bad_key.write_text('estimater = "x"\n')
    with pytest.raises(ValueError, match=r"unknown key\(s\) estimater; allowed: description, estimator, params"):
        VAEAnomalyDetector.from_config(bad_key)
    not_toml = tmp_path / "n.toml"
    not_toml.write_text("[params\n")
    with pytest.raises(ValueError, match="not valid TOML"):
        VAEAnomalyDetector.from_config(not_toml)
    with pytest.raises(FileNotFoundError):
        VAEAnomalyDetector.from_config(tmp_path / "missing.toml")
