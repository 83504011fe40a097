"""The training loop: early stopping restores the best weights, divergence is an error, seeds."""

import numpy as np
import pytest
import torch

from vaeguard.components.encoders import mlp
from vaeguard.components.likelihoods import DiagGaussianLikelihood, GaussianLikelihood
from vaeguard.model import VAE
from vaeguard.objectives import elbo
from vaeguard.training import FusedAdam, TrainingConfig, TrainingDivergedError, split_validation, train


def small_vae(d=4, seed=0):
    torch.manual_seed(seed)
    enc, dec = mlp((d,), 2, 1, hidden_dims=[16])
    return VAE(enc, dec, GaussianLikelihood((d,)), 2)


def lattice_vae(seed=0, mask_input=False):
    """The estimator's default kind of model on :func:`lattice_data`'s four columns: an MLP and
    ``diag_gaussian`` with a continuous column, a half-step lattice, a lattice with a floor and a
    binary column (two cells), whose likelihood has no parameters of its own."""
    torch.manual_seed(seed)
    enc, dec = mlp((8 if mask_input else 4,), 2, 2, output_shape=(4,), hidden_dims=[16])
    likelihood = DiagGaussianLikelihood(
        (4,),
        bin_widths=[0.0, 0.5, 0.5, 1.0],
        lattice_floor=[None, None, -1.0, 0.0],
        lattice_ceiling=[None, None, None, 1.0],
    )
    return VAE(enc, dec, likelihood, 2, mask_input=mask_input)


def lattice_data(n=300):
    """:func:`data` moved onto :func:`lattice_vae`'s lattices."""
    x = data(n=n).double()
    x[:, 1] = torch.round(2 * x[:, 1]) / 2
    x[:, 2] = (torch.round(2 * x[:, 2]) / 2).clamp(min=-1.0)
    x[:, 3] = (x[:, 3] > 0).double()
    return x


def data(n=400, d=4, seed=0):
    rng = np.random.default_rng(seed)
    return torch.tensor(
        rng.normal(size=(n, 2)) @ rng.normal(size=(2, d)) + 0.1 * rng.normal(size=(n, d)), dtype=torch.float32
    )


def test_training_improves_the_elbo_and_keeps_the_best_epoch():
    x = data()
    vae = small_vae()
    before = elbo(vae, x, torch.zeros(1, 2))[0].mean().item()
    config = TrainingConfig(epochs=40, batch_size=64, patience=5)
    hist = train(vae, x, config, generator=torch.Generator().manual_seed(0), device=torch.device("cpu"))
    after = elbo(vae, x, torch.zeros(1, 2))[0].mean().item()
    assert after > before + 0.5
    assert len(hist.validation_loss) == len(hist.train_loss)
    assert hist.validation_loss[hist.best_epoch] == min(
        [*hist.validation_loss[int(0.1 * 40) :], hist.validation_loss[hist.best_epoch]]
    )


def test_early_stopping_restores_the_best_weights():
    # A learning rate so high that validation loss gets worse after the first epochs.
    x = data(n=300)
    vae = small_vae()
    config = TrainingConfig(epochs=60, batch_size=16, learning_rate=0.05, patience=3, kl_warmup_fraction=0.0)
    hist = train(vae, x, config, generator=torch.Generator().manual_seed(0), device=torch.device("cpu"))
    assert hist.stopped_early and hist.best_epoch < len(hist.train_loss) - 1
    # Replay the generator to get the validation rows and draws train() used.
    gen = torch.Generator().manual_seed(0)
    _, val_idx = split_validation(300, config, gen)
    val_eps = torch.randn(1, len(val_idx), 2, generator=gen)
    with torch.no_grad():
        val = -elbo(vae, x[val_idx], val_eps)[0].mean().item()
    assert val == pytest.approx(min(hist.validation_loss), abs=1e-5)
    assert val == pytest.approx(hist.validation_loss[hist.best_epoch], abs=1e-5)


def test_an_image_model_trains_channels_last_and_comes_back_in_the_usual_layout(monkeypatch):
    # 2-D convolutions train channels-last (oneDNN's kernels need no reorder); the fitted model is handed back
    # with contiguous weights, as it is saved and copied for scoring
    from vaeguard.components.encoders import conv
    from vaeguard.components.likelihoods import DiscretizedLogisticLikelihood
    from vaeguard.objectives import training_terms

    torch.manual_seed(0)
    lik = DiscretizedLogisticLikelihood((1, 8, 8), n_levels=17)
    vae = VAE(*conv((1, 8, 8), 2, lik.param_count), lik, 2)
    layouts = []

    def watched(model, *args, **kwargs):
        convs = [m for m in model.encoder.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1]
        weight = convs[0].weight  # (with one input channel both layouts have the same strides)
        layouts.append(weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous())
        return training_terms(model, *args, **kwargs)

    monkeypatch.setattr("vaeguard.training.training_terms", watched)
    x = torch.randint(0, 17, (64, 1, 8, 8)).float()
    config = TrainingConfig(epochs=3, batch_size=32, patience=5)
    train(vae, x, config, generator=torch.Generator().manual_seed(0), device=torch.device("cpu"))
    assert layouts and all(layouts)
    assert all(p.is_contiguous() for p in vae.parameters())


def test_divergence_is_a_clear_error():
    x = data(n=100)
    x[7, 1] = float("nan")
    with pytest.raises(TrainingDivergedError, match="epoch 1"):
        train(
            small_vae(),
            x,
            TrainingConfig(epochs=2),
            generator=torch.Generator().manual_seed(0),
            device=torch.device("cpu"),
        )


def test_small_data_trains_without_a_validation_split():
    gen = torch.Generator().manual_seed(0)
    train_idx, val_idx = split_validation(50, TrainingConfig(), gen)
    assert len(val_idx) == 0 and len(train_idx) == 50
    hist = train(small_vae(), data(n=3), TrainingConfig(epochs=3), generator=gen, device=torch.device("cpu"))
    assert hist.validation_loss == [] and len(hist.train_loss) == 3


def test_same_generator_seed_same_weights():
    x = data()
    a, b = small_vae(seed=1), small_vae(seed=1)
    for m in (a, b):
        train(m, x, TrainingConfig(epochs=3), generator=torch.Generator().manual_seed(5), device=torch.device("cpu"))
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_validation_loss_does_not_depend_on_the_chunk_size():
    from vaeguard.training import validation_loss

    x = data(n=100)
    vae = small_vae()
    eps = torch.randn(1, 100, 2, generator=torch.Generator().manual_seed(0))
    whole = validation_loss(vae, x, eps, chunk=1000)
    assert validation_loss(vae, x, eps, chunk=7) == pytest.approx(whole, rel=1e-6)
    with torch.no_grad():
        assert whole == pytest.approx(-elbo(vae, x, eps)[0].mean().item(), rel=1e-6)


def test_validation_loss_with_trimming_is_the_mean_over_the_best_rows():
    """With trim_fraction f the monitor averages the best 1 - f of the rows, as training does per batch.

    The full mean would count the rows the model is told to give up on: it rises as soon as
    trimming starts, and early stopping then ends the fit at the end of the KL warm-up.
    """
    from vaeguard.training import validation_loss

    x = data(n=100)
    x[::10] += 1e3  # ten far rows: their -ELBO is far above every other row's
    vae = small_vae()
    eps = torch.randn(1, 100, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        per_row = -elbo(vae, x, eps)[0]
    far = torch.zeros(100, dtype=torch.bool)
    far[::10] = True
    assert per_row[far].min() > per_row[~far].max()
    trimmed = validation_loss(vae, x, eps, config=TrainingConfig(trim_fraction=0.1), chunk=7)
    assert trimmed == pytest.approx(per_row[~far].mean().item(), rel=1e-6)
    assert validation_loss(vae, x, eps) == pytest.approx(per_row.mean().item(), rel=1e-6)


def test_kl_schedules():
    from vaeguard.training import kl_weight_at

    total = 1000
    linear = [kl_weight_at(s, total, TrainingConfig(kl_warmup_fraction=0.1)) for s in range(total)]
    assert linear[0] == pytest.approx(0.01) and linear[49] == pytest.approx(0.5) and min(linear[99:]) == 1.0
    cyclical = [kl_weight_at(s, total, TrainingConfig(kl_schedule="cyclical")) for s in range(total)]
    starts = [0, 250, 500, 750]  # four cycles: ramp over the first half of each, then 1
    assert all(cyclical[s] == pytest.approx(1 / 125) for s in starts)
    assert all(cyclical[s + 124] == 1.0 and cyclical[s + 249] == 1.0 for s in starts)
    assert all(kl_weight_at(s, total, TrainingConfig(kl_schedule="constant")) == 1.0 for s in (0, 999))
    with pytest.raises(ValueError, match="kl_schedule must be one of linear, cyclical, constant"):
        train(small_vae(), data(), TrainingConfig(kl_schedule="warm"), generator=torch.Generator(), device="cpu")


def test_iwae_takes_no_regularizer_or_free_bits():
    config = TrainingConfig(objective="iwae", free_bits=0.1)
    with pytest.raises(ValueError, match="drop the regularizer and free_bits"):
        train(small_vae(), data(), config, generator=torch.Generator(), device="cpu")
    with pytest.raises(ValueError, match="objective must be 'elbo' or 'iwae'"):
        train(small_vae(), data(), TrainingConfig(objective="vi"), generator=torch.Generator(), device="cpu")


@pytest.fixture
def float64():
    """Models and data in float64 for the duration of a test."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


def _train_each_alone(models, x, config, seeds, **kwargs):
    return [
        train(m, x, config, generator=torch.Generator().manual_seed(s), device=torch.device("cpu"), **kwargs)
        for m, s in zip(models, seeds, strict=True)
    ]


@pytest.mark.parametrize(
    "config",
    [
        TrainingConfig(epochs=60, batch_size=32, patience=2, trim_fraction=0.2, learning_rate=1e-2),
        TrainingConfig(epochs=6, batch_size=32, objective="iwae", iwae_samples=3),
        TrainingConfig(epochs=6, batch_size=32, free_bits=0.5, kl_schedule="cyclical"),
    ],
    ids=["elbo-trimmed-early-stopping", "iwae", "free-bits"],
)
@pytest.mark.parametrize("kind", ["vmap", "batched"])
def test_models_trained_side_by_side_end_where_each_alone_would(config, kind, float64):
    """train_models steps three models at once (stacked parameters), each with its own
    validation rows, shuffles, draws, clipping and early stopping: every model and history equals
    train() with the same generator, up to the rounding of the batched kernels. In float64 that
    rounding (~1e-16) stays far below the tolerances over a few hundred steps on any CPU, and no
    early-stopping comparison can tip. "vmap": a likelihood with parameters of its own (σ per
    column), run under ``torch.func.vmap``; "batched": the default kind of model (MLP,
    ``diag_gaussian`` with lattices, a floor and a binary column), whose ELBO runs as batched
    matrix products without vmap (IWAE stays on vmap)."""
    from vaeguard.training import _StackedModels, train_models

    x = data(n=300).double() if kind == "vmap" else lattice_data()
    build = small_vae if kind == "vmap" else lattice_vae
    seeds = [3, 4, 5]
    alone = [build(seed=s) for s in seeds]
    together = [build(seed=s) for s in seeds]
    stack = _StackedModels.build(together, x, config, torch.device("cpu"), None, None)
    assert stack is not None
    assert (stack.native is not None) == (kind == "batched" and config.objective == "elbo")
    expected = _train_each_alone(alone, x, config, seeds)
    got = train_models(
        together, x, config, generators=[torch.Generator().manual_seed(s) for s in seeds], device=torch.device("cpu")
    )
    for a, b, ha, hb in zip(alone, together, expected, got, strict=True):
        assert (hb.best_epoch, hb.stopped_early, len(hb.train_loss)) == (
            ha.best_epoch,
            ha.stopped_early,
            len(ha.train_loss),
        )
        np.testing.assert_allclose(hb.validation_loss, ha.validation_loss, rtol=1e-10)
        for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
            torch.testing.assert_close(pb, pa, rtol=1e-9, atol=1e-10)
    if config.patience == 2:  # early stopping is per model: they stopped at different epochs
        assert len({len(h.train_loss) for h in got}) > 1 and all(h.stopped_early for h in got)


@pytest.mark.parametrize("kind", ["vmap", "batched"])
def test_models_with_missing_entries_train_side_by_side_like_alone(kind, float64):
    """As above with entries missing; "batched" also feeds the mask to the encoder (``mask_input``)."""
    from vaeguard.training import _StackedModels, train_models

    x = data(n=300).double() if kind == "vmap" else lattice_data()
    mask = torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) > 0.2
    x = torch.where(mask, x, torch.zeros_like(x))
    config = TrainingConfig(epochs=4, batch_size=32)
    seeds = [1, 2]

    def build(seed):
        return small_vae(seed=seed) if kind == "vmap" else lattice_vae(seed=seed, mask_input=True)

    stack = _StackedModels.build([build(s) for s in seeds], x, config, torch.device("cpu"), mask, None)
    assert (stack.native is not None) == (kind == "batched")
    alone = _train_each_alone([build(s) for s in seeds], x, config, seeds, mask=mask)
    together = train_models(
        [build(s) for s in seeds],
        x,
        config,
        generators=[torch.Generator().manual_seed(s) for s in seeds],
        device=torch.device("cpu"),
        mask=mask,
    )
    for ha, hb in zip(alone, together, strict=True):
        np.testing.assert_allclose(hb.validation_loss, ha.validation_loss, rtol=1e-10)


class _BranchingEncoder(torch.nn.Module):
    """A plugin-style encoder with data-dependent control flow, which vmap cannot run."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        if (x > 1e6).any():  # a Python branch on the data
            raise ValueError("too large")
        return self.inner(x)


def test_models_vmap_cannot_run_are_trained_one_after_another():
    from vaeguard.training import _StackedModels, train_models

    def branching_vae(seed):
        vae = small_vae(seed=seed)
        vae.encoder = _BranchingEncoder(vae.encoder)
        return vae

    x, config, seeds = data(n=200), TrainingConfig(epochs=3, batch_size=32), [7, 8]
    assert _StackedModels.build([branching_vae(s) for s in seeds], x, config, torch.device("cpu"), None, None) is None
    alone = [branching_vae(s) for s in seeds]
    _train_each_alone(alone, x, config, seeds)
    together = [branching_vae(s) for s in seeds]
    train_models(together, x, config, generators=[torch.Generator().manual_seed(s) for s in seeds], device="cpu")
    for a, b in zip(alone, together, strict=True):
        for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
            assert torch.equal(pa, pb)  # the same code path: bit for bit


def test_epoch_lines_say_every_tenth_and_where_training_stopped():
    import io

    from vaeguard.training import EpochLines

    out = io.StringIO()
    lines = EpochLines(50, stream=out)
    for _ in range(12):
        lines.set_postfix(loss="3.000", val="3.100")
        lines.update(1)
    lines.finish()
    lines.close()
    said = [line.split(" (")[0] for line in out.getvalue().splitlines()]
    assert said == ["training: epoch 5/50", "training: epoch 10/50", "training: stopped at epoch 12/50"]
    assert "training loss 3.000, validation loss 3.100 nats" in out.getvalue()


def test_only_networks_that_declare_it_run_as_batched_matrix_products(float64):
    """A subclass of the built-in MLP may change its forward: unless it declares ``stacks_as_sequential``
    itself, its stacked copies run under vmap (which runs whatever forward it has)."""
    from vaeguard.components.encoders import MLPEncoder
    from vaeguard.training import _StackedModels

    class Shifted(MLPEncoder):
        def forward(self, x, condition=None):
            return super().forward(x, condition) + 1.0

    def shifted_vae(seed):
        vae = lattice_vae(seed=seed)
        shifted = Shifted(4, [16], 2)
        shifted.load_state_dict(vae.encoder.state_dict())
        vae.encoder = shifted
        return vae

    x, config = lattice_data(), TrainingConfig(epochs=1, batch_size=32)
    plain = _StackedModels.build([lattice_vae(seed=s) for s in (1, 2)], x, config, torch.device("cpu"), None, None)
    shifted = _StackedModels.build([shifted_vae(s) for s in (1, 2)], x, config, torch.device("cpu"), None, None)
    assert plain.native is not None
    assert shifted is not None and shifted.native is None


def test_stacked_clipping_scales_each_models_gradient_as_clip_grad_norm_would(float64):
    """_StackedModels.clip_gradients: each model's gradient (over all its parameters) scaled to norm ≤ max_norm,
    as ``torch.nn.utils.clip_grad_norm_`` does for that model alone; the norms returned are the norms before."""
    from vaeguard.training import _StackedModels

    config = TrainingConfig(epochs=1, batch_size=32)
    models = [lattice_vae(seed=s) for s in (1, 2, 3)]
    stack = _StackedModels.build(models, lattice_data(), config, torch.device("cpu"), None, None)
    generator = torch.Generator().manual_seed(0)
    grads = {k: torch.randn(v.shape, generator=generator) for k, v in stack.params.items()}
    for g in grads.values():
        g[1] *= 1e-3  # model 2's gradient is short: left alone
    alone = []
    for i in range(3):
        params = [torch.zeros(v.shape[1:], requires_grad=True) for v in grads.values()]
        for p, g in zip(params, grads.values(), strict=True):
            p.grad = g[i].clone()
        before = torch.nn.utils.clip_grad_norm_(params, max_norm=1.5)
        alone.append((before, [p.grad for p in params]))
    for p, g in zip(stack.params.values(), grads.values(), strict=True):
        p.grad.copy_(g)  # the stack's gradients are views of its one gradient tensor, which it clips
    norms = stack.clip_gradients(1.5)
    for i, (before, clipped) in enumerate(alone):
        torch.testing.assert_close(norms[i], before, rtol=1e-12, atol=0)
        for p, g in zip(stack.params.values(), clipped, strict=True):
            torch.testing.assert_close(p.grad[i], g, rtol=1e-12, atol=1e-15)
    assert norms[1] < 1.5 < norms[0] and norms[2] > 1.5


def _linear_vae(d=6, latent=3, seed=0):
    torch.manual_seed(seed)
    return VAE(torch.nn.Linear(d, 2 * latent), torch.nn.Linear(latent, 2 * d), DiagGaussianLikelihood((d,)), latent)


def test_networks_in_bfloat16_round_the_products_within_bfloat16s_error_and_hand_back_float32():
    # y = Wz + b with W, z and b rounded to bfloat16 (unit roundoff u = 2^-8), accumulated in float32 and the
    # sum rounded to bfloat16 once more: |ỹ - y| ≤ (3u + u² + n·2^-24 + ...)(|W||z| + |b|) ≤ (3u + 2^-12)(|W||z| + |b|)
    from vaeguard.training import networks_in

    vae = _linear_vae()
    z = torch.randn(50, 3, generator=torch.Generator().manual_seed(1))
    exact = vae.decode(z)
    with networks_in(vae, "bfloat16"):
        rounded = vae.decode(z)
        mu, logvar = vae.encode(torch.randn(50, 6))
    assert rounded.dtype == mu.dtype == logvar.dtype == torch.float32
    assert not torch.equal(rounded, exact)  # the block did change the arithmetic
    layer = vae.decoder
    scale = (z.double().abs() @ layer.weight.double().abs().T + layer.bias.double().abs()).reshape(exact.shape)
    u = 2.0**-8
    assert ((rounded.double() - exact.double()).abs() <= (3 * u + 2.0**-12) * scale).all()
    assert vae.network_precision is None and torch.equal(vae.decode(z), exact)  # restored on leaving


def test_a_bfloat16_training_step_keeps_parameters_gradients_and_loss_in_float32(monkeypatch):
    from vaeguard.components.encoders import conv
    from vaeguard.components.likelihoods import DiscretizedLogisticLikelihood
    from vaeguard.objectives import training_terms

    seen = []

    def watched(model, *args, **kwargs):
        terms = training_terms(model, *args, **kwargs)
        seen.append((model.network_precision, terms.recon.dtype, terms.kl.dtype))
        return terms

    monkeypatch.setattr("vaeguard.training.training_terms", watched)
    lik = DiscretizedLogisticLikelihood((1, 8, 8), n_levels=17)
    x = torch.randint(0, 17, (64, 1, 8, 8)).float()
    fitted = {}
    for precision in ("float32", "bfloat16"):
        torch.manual_seed(0)
        vae = VAE(*conv((1, 8, 8), 2, lik.param_count), lik, 2)
        config = TrainingConfig(epochs=3, batch_size=32, patience=5, precision=precision)
        history = train(vae, x, config, generator=torch.Generator().manual_seed(0), device=torch.device("cpu"))
        assert all(np.isfinite(history.train_loss))
        assert vae.network_precision is None  # scoring after training runs in the data's dtype
        assert all(p.dtype == torch.float32 for p in vae.parameters())
        fitted[precision] = torch.cat([p.detach().flatten() for p in vae.parameters()])
    steps = [s for s in seen if s[0] is not None]
    assert steps and all(recon == kl == torch.float32 for _, recon, kl in steps)
    assert {s[0] for s in seen} == {None, torch.bfloat16}  # training steps in bfloat16, validation as the data
    assert not torch.equal(fitted["float32"], fitted["bfloat16"])


def test_models_that_train_in_bfloat16_are_trained_one_after_another():
    from vaeguard.training import train_models

    x, seeds = data(n=200), [7, 8]
    config = TrainingConfig(epochs=3, batch_size=32, precision="bfloat16")
    alone = [small_vae(seed=s) for s in seeds]
    _train_each_alone(alone, x, config, seeds)
    together = [small_vae(seed=s) for s in seeds]
    train_models(together, x, config, generators=[torch.Generator().manual_seed(s) for s in seeds], device="cpu")
    for a, b in zip(alone, together, strict=True):
        for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
            assert torch.equal(pa, pb)


def test_an_unknown_training_precision_is_refused_by_name():
    with pytest.raises(ValueError, match="precision must be one of float32, bfloat16; got 'float16'"):
        config = TrainingConfig(epochs=1, precision="float16")
        train(small_vae(), data(n=100), config, generator=torch.Generator().manual_seed(0), device=torch.device("cpu"))


@pytest.mark.parametrize("weight_decay", [0.0, 1e-3])
def test_the_written_out_adam_steps_as_torchs_fused_adam_to_the_bit(weight_decay):
    generator = torch.Generator().manual_seed(0)
    shapes = [((3, 4), torch.float32), ((5,), torch.float64), ((2, 2), torch.float32)]
    ours = [torch.randn(*s, generator=generator, dtype=t).requires_grad_(True) for s, t in shapes]
    theirs = [p.detach().clone().requires_grad_(True) for p in ours]
    mine = FusedAdam(ours, lr=3e-3, weight_decay=weight_decay)
    reference = torch.optim.Adam(theirs, lr=3e-3, weight_decay=weight_decay, fused=True)
    for step in range(6):
        grads = [10.0 ** (step - 3) * torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in ours]
        for params, optimizer in ((ours, mine), (theirs, reference)):
            optimizer.zero_grad(set_to_none=True)
            for i, (p, g) in enumerate(zip(params, grads, strict=True)):
                if not (i == 2 and step < 2):  # the last parameter has no gradient in the first two steps
                    p.grad = g.clone()
            optimizer.step()
        for a, b in zip(ours, theirs, strict=True):
            assert torch.equal(a, b)
    assert torch.equal(mine.state[id(ours[2])][0], reference.state[theirs[2]]["step"])  # stepped 4 times, not 6
    mine.zero_grad()
    assert all(p.grad is None for p in ours)


def test_a_fit_and_its_scoring_do_not_import_torch_dynamo():
    # torch.optim's first optimizer imports torch._dynamo: ~1.4 s of every `vaeguard fit`, as long as the
    # training of a small table's first epochs
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import numpy as np\n"
        "from vaeguard import VAEAnomalyDetector\n"
        "X = np.random.default_rng(0).normal(size=(300, 4))\n"
        "VAEAnomalyDetector(random_state=0, epochs=2).fit(X).score_samples(X[:5])\n"
        "VAEAnomalyDetector(random_state=0, epochs=2, n_models=1).fit(X).score_samples(X[:5])\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr
