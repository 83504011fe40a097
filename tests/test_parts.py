"""The plugin contract (vaeguard/parts.py): protocols the built-ins satisfy, and capabilities a part declares
instead of the core reading them off a signature."""

import inspect

import numpy as np
import pytest

from vaeguard import VAEAnomalyDetector
from vaeguard.parts import CAPABILITIES, Codec, EncoderFamily, Regularizer, declare, declares
from vaeguard.plugins import get_part, get_registry


def test_declarations_are_checked_and_read_back():
    with pytest.raises(ValueError, match="unknown capability 'takes_condition'"):
        declare(takes_condition=True)

    @declare(takes_conditions=True)
    def family(input_shape, latent_dim, n_params, **options):
        raise NotImplementedError

    assert declares(family, "takes_conditions") and not declares(family, "reports_progress")
    assert not declares(lambda: None, "takes_conditions")
    with pytest.raises(ValueError, match="unknown capability"):
        declares(family, "anything")


def test_the_built_ins_follow_the_protocols_and_declare_what_they_do():
    """Each built-in satisfies its protocol, and a declaration says exactly what the part accepts: the
    families that declare takes_conditions are those whose signature has condition_dim, the codecs that
    declare reports_progress take it in encode and decode."""
    registry = get_registry()
    for name in registry.names("encoders"):
        family = get_part("encoders", name)
        assert isinstance(family, EncoderFamily)
        assert declares(family, "takes_conditions") == ("condition_dim" in inspect.signature(family).parameters)
    for name in registry.names("codecs"):
        codec = get_part("codecs", name)()
        assert isinstance(codec, Codec)
        takes = all("progress" in inspect.signature(m).parameters for m in (codec.encode, codec.decode))
        assert declares(codec, "reports_progress") == takes
    for name in registry.names("regularizers"):
        assert isinstance(get_part("regularizers", name)(), Regularizer)
    assert set(CAPABILITIES) == {"takes_conditions", "reports_progress"}


def test_a_plugin_family_that_declares_conditions_builds_a_conditional_model(monkeypatch):
    import vaeguard.estimators as estimators

    mlp = get_part("encoders", "mlp")

    @declare(takes_conditions=True)
    def mine(input_shape, latent_dim, n_params, *, output_shape=None, hidden_dims=None, condition_dim=0):
        return mlp(
            input_shape, latent_dim, n_params, output_shape=output_shape, hidden_dims=[8], condition_dim=condition_dim
        )

    real = estimators.get_part
    monkeypatch.setattr(estimators, "get_part", lambda kind, name: mine if name == "mine" else real(kind, name))
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(120, 3)), rng.choice(["a", "b"], 120)
    det = VAEAnomalyDetector(conditional=True, encoder="mine", epochs=2, latent_dim=2, random_state=0).fit(X, y)
    assert det.model_spec_["condition_dim"] == 2 and np.isfinite(det.score_samples(X, condition=y)).all()
