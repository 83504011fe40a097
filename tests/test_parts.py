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


def test_the_position_independent_softplus_gives_an_element_one_value_wherever_it_sits():
    # torch's CPU softplus rounds an element differently in its vectorised loop and its scalar remainder;
    # a float32 scoring copy's rows would then score differently by the rows beside them
    import torch

    from vaeguard.parts import soft_clamp, softplus_alike_everywhere

    generator = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(997, generator=generator) * 8, torch.tensor([-100.0, -20.0, 0.0, 20.0, 100.0])])
    whole = softplus_alike_everywhere(x)
    for start, length in ((0, 1), (3, 1), (5, 37), (17, 5), (1, 64), (990, 12)):
        part = x[start : start + length].clone()
        np.testing.assert_array_equal(softplus_alike_everywhere(part), whole[start:][:length])
    for i in range(0, len(x), 97):
        assert softplus_alike_everywhere(x[i : i + 1].clone()).item() == whole[i].item()
    # the same function as softplus, to a few units of float32 rounding (log(1 + eˣ) ≥ 0, so relative)
    reference = torch.nn.functional.softplus(x.double())
    np.testing.assert_allclose(whole.double(), reference, rtol=4 * 2.0**-24, atol=1e-44)
    wide = torch.randn(2000, generator=generator) * 6
    np.testing.assert_allclose(
        soft_clamp(wide, -6.0, 4.0, alike_everywhere=True), soft_clamp(wide, -6.0, 4.0), rtol=0, atol=1e-5
    )
