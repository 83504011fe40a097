"""The vaeguard plugin contract: pluggy hook specifications, nothing else.

Every hook is registration-style: vaeguard calls it with a ``register`` callable and a
plugin calls ``register(name, factory)`` once per part it provides. Plugins return
nothing. The built-in parts are registered through exactly these hooks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # the parts' classes name the contract; importing them here would import torch
    from vaeguard.parts import Codec, EncoderFamily, Likelihood, Regularizer

hookspec = pluggy.HookspecMarker("vaeguard")
hookimpl = pluggy.HookimplMarker("vaeguard")

Register = Callable[[str, Any], None]
RegisterEncoders = Callable[[str, "EncoderFamily"], None]
RegisterLikelihoods = Callable[[str, "type[Likelihood]"], None]
RegisterRegularizers = Callable[[str, Callable[..., "Regularizer"]], None]
RegisterCodecs = Callable[[str, Callable[..., "Codec"]], None]


@hookspec
def vaeguard_register_encoders(register: RegisterEncoders) -> None:
    """Register network families (an encoder and its mirrored decoder).

    :param register: call ``register(name, family)`` for each family. ``family`` is a
        callable ``family(input_shape, latent_dim, n_params, **options)`` returning an
        ``(encoder, decoder)`` pair of ``torch.nn.Module`` s: ``encoder(x)`` maps a batch
        ``(batch, *input_shape)`` to ``(batch, 2 * latent_dim)`` (means, then
        log-variances) and ``decoder(z)`` maps ``(batch, latent_dim)`` to
        ``(batch, n_params, *input_shape)`` (:class:`vaeguard.parts.EncoderFamily`). A family
        that supports conditional VAEs declares it (``@vaeguard.parts.declare(takes_conditions=True)``),
        accepts the option ``condition_dim`` (m > 0) and returns networks called as
        ``encoder(x, c)`` and ``decoder(z, c)`` with c of shape ``(batch, m)``; a family
        that does not declare it is refused for conditional models with a clear message.
    """


@hookspec
def vaeguard_register_likelihoods(register: RegisterLikelihoods) -> None:
    """Register observation models p(x|z).

    :param register: call ``register(name, cls)`` for each likelihood. ``cls`` is a
        :class:`vaeguard.parts.Likelihood` subclass: a normalised
        density or mass function whose ``log_prob(x, params, mask=None)`` returns one
        value in nats per sample.
    """


@hookspec
def vaeguard_register_regularizers(register: RegisterRegularizers) -> None:
    """Register disentanglement regularizers.

    :param register: call ``register(name, factory)``; ``factory(**params)`` returns an
        object with ``penalty(terms, step) -> torch.Tensor``: a scalar in nats per sample
        added to the minibatch's mean −ELBO. ``terms`` is a
        :class:`vaeguard.objectives.TrainingTerms` (the batch, μ, log σ², one code z per
        row, the reconstruction term, the KL per dimension, the schedule's KL weight, the
        data set size, the run's random generator). The validation loss calls it under
        ``torch.no_grad()`` with ``step = -1``, so ``penalty`` must change nothing. A
        regularizer that trains a network of its own defines ``update(terms, step) -> None``
        as well: the training loop calls it after each optimisation step of the VAE.
    """


@hookspec
def vaeguard_register_codecs(register: RegisterCodecs) -> None:
    """Register latent-code compression codecs.

    :param register: call ``register(name, factory)``; ``factory(**params)`` returns an
        object with ``encode(model, x) -> (payload: bytes, info: dict)``,
        ``decode(model, payload, n) -> x``, ``params() -> dict`` (the settings the container
        records, passed back to ``factory`` to decode) and a ``lossless`` attribute. ``model``
        is a :class:`vaeguard.parts.CodingModel` (the network, latent size, likelihood name
        and element scales of the fitted detector), ``x`` a tensor of ``n`` samples in the model's units
        ``(n, *event_shape)``; ``info`` (JSON) goes into the container's header
        (:class:`vaeguard.parts.Codec`). A codec declared with
        ``@vaeguard.parts.declare(reports_progress=True)`` takes a keyword ``progress`` in
        ``encode`` and ``decode``: a callable told the number of samples done since its last call.
    """


@hookspec
def vaeguard_register_commands(cli: Any) -> None:
    """Add click commands to the ``vaeguard`` command group.

    :param cli: the :class:`click.Group`; call ``cli.add_command`` or use ``@cli.command``.
        Put several commands in a subgroup of their own.
    """
