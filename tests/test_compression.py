"""compress / decompress with the bitsback codec: exact round trips, rates near −ELBO, determinism, refusals."""

import copy
import math
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.datasets import load_digits

from vaeguard import VAEAnomalyDetector, compress, decompress, load
from vaeguard.components.codecs import decode_integer_codes, encode_integer_codes
from vaeguard.compression import read_header

QUICK = {"epochs": 40, "random_state": 0, "device": "cpu", "n_importance_samples": 16, "n_models": 1}


@pytest.fixture(scope="module")
def digits():
    images = load_digits().images
    order = np.random.default_rng(0).permutation(len(images))
    return images[order[:1000]], images[order[1400:]]


@pytest.fixture(scope="module")
def binary_model(digits):
    train, _ = digits
    return VAEAnomalyDetector(**QUICK).fit((train >= 8).astype(np.uint8))


def test_binary_images_round_trip_at_about_the_negative_elbo(binary_model, digits):
    held_out = (digits[1] >= 8).astype(np.uint8)
    blob = compress(binary_model, held_out)
    back = decompress(binary_model, blob)
    assert back.dtype == np.uint8 and np.array_equal(back, held_out)
    header, payload = read_header(blob)
    assert (
        header["codec"] == "bitsback"
        and header["info"]["initial_bits"] + header["info"]["net_bits"] == len(payload) * 8
    )
    # how near the net size comes to what it should is checked by construction, against the discretised
    # −ELBO sampled from the model itself: test_the_exact_coder_approaches_the_discretised_elbo_within_its_own_error
    packed = np.packbits(held_out.reshape(-1)).nbytes * 8
    assert len(payload) * 8 < 0.8 * packed


def test_the_whole_digits_set_round_trips_in_one_container(binary_model):
    everything = (load_digits().images >= 8).astype(np.uint8)  # 1797 images, the largest batch at hand
    assert np.array_equal(decompress(binary_model, compress(binary_model, everything)), everything)


def test_levels_and_8_bit_images_and_edge_cases_round_trip(digits):
    train, held_out = digits
    det = VAEAnomalyDetector(**{**QUICK, "epochs": 10}).fit(train)  # float levels 0..16
    for batch in (held_out[:1], np.zeros((2, 8, 8)), held_out[:40]):
        assert np.array_equal(decompress(det, compress(det, batch)), batch)
    eight_bit = (train * 15).astype(np.uint8)
    det8 = VAEAnomalyDetector(**{**QUICK, "epochs": 5}).fit(eight_bit)
    sample = np.vstack([eight_bit[:5], np.full((1, 8, 8), 255, np.uint8)])  # 255 was never seen in training
    assert np.array_equal(decompress(det8, compress(det8, sample, codec_params={"latent_bits": 8})), sample)


def test_categorical_tables_round_trip_and_unseen_categories_are_refused():
    rng = np.random.default_rng(1)
    kind = rng.choice(["a", "b", "c"], size=600)
    frame = pd.DataFrame(
        {"kind": kind, "size": np.where(kind == "a", "small", rng.choice(["small", "large"], 600)), "flag": kind == "c"}
    )
    det = VAEAnomalyDetector(**{**QUICK, "epochs": 10}).fit(frame)
    back = decompress(det, compress(det, frame.iloc[:50]))
    assert isinstance(back, pd.DataFrame) and back.astype(str).equals(frame.iloc[:50].astype(str))
    unseen = frame.iloc[:3].copy()
    unseen.loc[1, "kind"] = "zebra"
    with pytest.raises(ValueError, match="column 'kind', row 1: category 'zebra' was not seen in training"):
        compress(det, unseen)


def test_a_column_constant_in_training_comes_back_as_its_value_and_a_missing_one_is_refused():
    rng = np.random.default_rng(2)
    X = np.column_stack([rng.normal(3.0, 1.0, 400), np.full(400, 5.0), rng.normal(6.0, 2.0, 400)])
    det = VAEAnomalyDetector(**{**QUICK, "epochs": 10}).fit(X)
    assert det.input_space_.modelled.tolist() == [0, 2]
    back = decompress(det, compress(det, X[:40], codec="latent"))
    assert back.shape == (40, 3) and (back[:, 1] == 5.0).all()
    changed = X[:3].copy()
    changed[2, 1] = np.nan
    with pytest.raises(ValueError, match="row 2 has missing values"):
        compress(det, changed, codec="latent")


def test_the_bits_do_not_depend_on_threads_or_the_process(binary_model, digits, tmp_path):
    held_out = (digits[1][:60] >= 8).astype(np.uint8)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        blob = compress(binary_model, held_out)
        streamed = compress(binary_model, held_out, codec_params={"streams": 7})
        grouped = compress(binary_model, held_out, codec_params={"streams": 7, "groups": 3})
    finally:
        torch.set_num_threads(threads)
    path = tmp_path / "m.h5"
    binary_model.save(path)
    (tmp_path / "data.vgz").write_bytes(blob)
    code = (
        "import sys, numpy as np; from vaeguard import decompress; "
        "np.save(sys.argv[2], decompress(sys.argv[1], open(sys.argv[3], 'rb').read()))"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "back.npy"
    subprocess.run([sys.executable, "-c", code, str(path), str(out), str(tmp_path / "data.vgz")], check=True, env=env)
    assert np.array_equal(np.load(out), held_out)
    assert compress(path, held_out) == blob  # the same bits from the model file in this process
    for lock_step in (streamed, grouped):  # batched network calls: the same shapes on both sides; groups' threads
        (tmp_path / "data.vgz").write_bytes(lock_step)
        subprocess.run(
            [sys.executable, "-c", code, str(path), str(out), str(tmp_path / "data.vgz")], check=True, env=env
        )
        assert np.array_equal(np.load(out), held_out)


def test_lock_step_streams_round_trip_and_cost_their_initial_bits(binary_model, digits):
    """streams=S codes S contiguous blocks on S stacks: exact, S × the initial bits, net bits as one stack's plus
    at most two 32-bit words per stack (each stack's final state and partial word)."""
    from vaeguard.components.codecs import BitsBackCodec, stream_rows

    held_out = (digits[1] >= 8).astype(np.uint8)  # 397 images: the last of 4 streams holds 97
    one = read_header(compress(binary_model, held_out))[0]["info"]
    blob = compress(binary_model, held_out, codec_params={"streams": 4})
    header, payload = read_header(blob)
    assert header["codec_params"]["streams"] == 4 and np.array_equal(decompress(binary_model, blob), held_out)
    info = header["info"]
    assert info["initial_bits"] == 4 * one["initial_bits"]
    assert abs(info["net_bits"] - one["net_bits"]) <= 4 * 64
    assert len(payload) * 8 == info["initial_bits"] + info["net_bits"] + 4 * 32  # plus the four stack lengths
    # more streams than samples, and the schedule: every row once, blocks contiguous, the last one short
    few = held_out[:3]
    assert np.array_equal(decompress(binary_model, compress(binary_model, few, codec_params={"streams": 8})), few)
    steps = stream_rows(10, 4)
    assert [r.tolist() for r in steps] == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    codec = BitsBackCodec(streams=4)
    words = np.frombuffer(payload, dtype="<u4").copy()
    words[0] += 1  # a stack length that no longer adds up
    with pytest.raises(ValueError, match="stack lengths do not add up"):
        codec.decode(binary_model.coding_model(), words.tobytes(), len(held_out))
    with pytest.raises(ValueError, match=r"streams must be .auto. or an integer in \[1, 4096\]"):
        compress(binary_model, few, codec_params={"streams": 0})


def test_the_default_number_of_streams_grows_with_the_data_and_keeps_the_net_size(binary_model, digits):
    from vaeguard.components.codecs import SAMPLES_PER_STREAM

    many = np.tile((digits[1] >= 8).astype(np.uint8), (11, 1, 1))[: 2 * SAMPLES_PER_STREAM + 5]
    blob = compress(binary_model, many)  # streams="auto": one per SAMPLES_PER_STREAM samples
    header = read_header(blob)[0]
    assert header["codec_params"]["streams"] == 2 and np.array_equal(decompress(binary_model, blob), many)
    one = read_header(compress(binary_model, many, codec_params={"streams": 1}))[0]["info"]
    # the bound: the net size within 1 % of one stream's (measured: 320 bits less of 119 232)
    assert abs(header["info"]["net_bits"] - one["net_bits"]) < 0.01 * one["net_bits"]
    assert read_header(compress(binary_model, many[:50]))[0]["codec_params"]["streams"] == 1
    # large samples get one stack per 2**20 raw bits where that is more: 10,000 8-bit 28 x 28 images, 59 stacks
    from vaeguard.components.codecs import BitsBackCodec

    auto = BitsBackCodec()
    assert auto.stream_count(10_000, 784 * 8) == 59 and auto.stream_count(10_000, 784) == 20
    assert auto.stream_count(100_000, 784 * 8) == 64 and auto.stream_count(100, 784 * 8) == 1


def test_progress_is_told_of_every_sample(binary_model, level_model, digits):
    held_out = digits[1][:45]
    bits = (held_out >= 8).astype(np.uint8)
    for params in ({}, {"streams": 4}):
        told = []
        blob = compress(binary_model, bits, codec_params=params, progress=told.append)
        groups = read_header(blob)[0]["codec_params"].get("groups", 1)
        assert sum(told) == 45 and len(told) == groups * -(-45 // params.get("streams", 1))  # a call per group step
        told.clear()
        assert np.array_equal(decompress(binary_model, blob, progress=told.append), bits) and sum(told) == 45
    told = []
    compress(level_model, held_out, codec="latent", progress=told.append)
    assert sum(told) == 45


def test_codecs_are_told_of_progress_only_when_they_declare_it():
    from vaeguard.compression import _with_progress
    from vaeguard.parts import declare

    class Quiet:
        def encode(self, det, x):
            return b"", {}

    @declare(reports_progress=True)
    class Chatty:
        def encode(self, det, x, progress=None):
            return b"", {}

    assert _with_progress(Quiet(), print) == {} and _with_progress(Chatty(), None) == {}
    assert _with_progress(Chatty(), print) == {"progress": print}


def test_refusals_name_the_problem(binary_model, digits):
    held_out = (digits[1][:5] >= 8).astype(np.uint8)
    blob = compress(binary_model, held_out)
    other = VAEAnomalyDetector(**{**QUICK, "epochs": 2}).fit((digits[0] >= 8).astype(np.uint8))
    with pytest.raises(ValueError, match="compressed with the model .* not with this one"):
        decompress(other, blob)
    with pytest.raises(ValueError, match="truncated or altered"):
        decompress(binary_model, blob[:-4])
    altered = bytearray(blob)
    altered[-20] ^= 0x5A
    with pytest.raises(ValueError, match="truncated or altered"):
        decompress(binary_model, bytes(altered))
    with pytest.raises(ValueError, match="truncated or altered"):
        decompress(binary_model, blob[:12])
    with pytest.raises(ValueError, match="not a vaeguard compressed file"):
        decompress(binary_model, b"PK\x03\x04 hello")
    dense = VAEAnomalyDetector(**{**QUICK, "epochs": 2}).fit(np.random.default_rng(0).normal(size=(50, 3)))
    with pytest.raises(ValueError, match="lossless only for discrete data"):
        compress(dense, np.zeros((2, 3)))
    holes = held_out.astype(float)
    holes[2, 0, 0] = np.nan
    with pytest.raises(ValueError, match="row 2 has missing values"):
        compress(binary_model, holes)
    with pytest.raises(ValueError, match="unknown codec 'zip'"):
        compress(binary_model, held_out, codec="zip")
    with pytest.raises(ValueError, match="does not take these parameters"):
        compress(binary_model, held_out, codec_params={"level": 9})


@pytest.fixture(scope="module")
def level_model(digits):
    return VAEAnomalyDetector(**{**QUICK, "epochs": 20}).fit(digits[0])


def test_latent_codec_trades_bits_for_distortion(level_model, digits):
    held_out = digits[1]
    sizes, errors = [], []
    for step in (2.0, 0.5, 0.1):
        blob = compress(level_model, held_out, codec="latent", codec_params={"step": step})
        back = decompress(level_model, blob)
        assert back.shape == held_out.shape and set(np.unique(back)) <= set(range(17))  # on the pixel levels
        sizes.append(len(blob))
        errors.append(float(((back - held_out) ** 2).mean()))
    assert sizes[0] < sizes[1] < sizes[2]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < ((held_out - held_out.mean()) ** 2).mean() / 4  # far better than the mean image
    with pytest.raises(ValueError, match="step must be a number"):
        compress(level_model, held_out, codec="latent", codec_params={"step": -1})
    with pytest.raises(ValueError, match="does not take these parameters"):
        compress(level_model, held_out, codec="latent", codec_params={"rate_weight": 1})


def test_latent_payload_is_the_documented_codes_and_steps(level_model, digits):
    """Decoding by hand — the integer codes, the steps as their column side information — gives decompress's output."""
    held_out = digits[1][:50]
    blob = compress(level_model, held_out, codec="latent", codec_params={"step": 0.5})
    _, payload = read_header(blob)
    codes, (steps,) = decode_integer_codes(payload, len(held_out), level_model.latent_dim_, side_rows=1)
    model = level_model._scoring_model().double()
    with torch.no_grad():
        mean = model.likelihood.mean(model.decode(torch.from_numpy(codes * steps))).numpy()
    assert np.array_equal(decompress(level_model, blob), level_model.from_model_space(mean))


def test_latent_dimensions_the_decoder_ignores_cost_nothing(level_model, digits):
    def codes_and_steps(det):
        _, payload = read_header(compress(det, digits[1], codec="latent", codec_params={"step": 0.5}))
        codes, (steps,) = decode_integer_codes(payload, len(digits[1]), det.latent_dim_, side_rows=1)
        return codes, steps

    _, trained_steps = codes_and_steps(level_model)
    coded = trained_steps > 0  # the dimensions the trained decoder reads (a collapsed one may be left out)
    dropped = int(np.flatnonzero(coded)[0])
    det = copy.deepcopy(level_model)
    first = next(m for m in det.model_.decoder.modules() if isinstance(m, torch.nn.Linear))
    with torch.no_grad():
        first.weight[:, dropped] = 0  # the decoder no longer reads this latent dimension
    codes, steps = codes_and_steps(det)
    assert (codes[:, dropped] == 0).all() and steps[dropped] == 0  # not coded: no step, no code model travels
    still = coded.copy()
    still[dropped] = False
    assert still.sum() >= 2  # the check below has dimensions to look at (how many are active depends on the fit)
    assert (steps[still] > 0).all() and (codes[:, still].std(axis=0) > 0).all()  # the others are coded as before


def test_a_decoder_that_ignores_its_code_costs_one_bit_per_dimension(level_model, digits):
    det = copy.deepcopy(level_model)
    first = next(m for m in det.model_.decoder.modules() if isinstance(m, torch.nn.Linear))
    with torch.no_grad():
        first.weight.zero_()  # every code decodes to the same mean
    blob = compress(det, digits[1][:20], codec="latent")
    assert len(read_header(blob)[1]) == -(-det.latent_dim_ // 8)
    back = decompress(det, blob)
    assert (back == back[0]).all()


def test_latent_side_information_vanishes_at_the_coarsest_step(level_model, digits):
    """All-zero codes cost one bit per latent dimension: no steps, no code model, no ANS words."""
    _, payload = read_header(compress(level_model, digits[1], codec="latent", codec_params={"step": 9.9}))
    assert len(payload) == -(-level_model.latent_dim_ // 8)
    codes, _ = decode_integer_codes(payload, len(digits[1]), level_model.latent_dim_)
    assert not codes.any()


def test_an_all_zero_code_decodes_to_the_models_mean(level_model, digits):
    """Nothing sent about any sample: every one decodes to E_p(z)[f(z)], not to the decoder's f(0)."""
    train, held_out = digits
    blob = compress(level_model, held_out, codec="latent", codec_params={"step": 9.9})
    codes, _ = decode_integer_codes(read_header(blob)[1], len(held_out), level_model.latent_dim_)
    assert not codes.any()
    back = decompress(level_model, blob)
    assert (back == back[0]).all()
    # the same expectation by plain Monte Carlo, 2¹⁷ independent draws from the N(0, I) prior
    model = level_model._scoring_model().double()
    z = torch.randn(2**17, level_model.latent_dim_, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with torch.no_grad():
        expected = torch.cat([model.likelihood.mean(model.decode(part)) for part in z.split(8192)]).mean(0).numpy()
        at_zero = model.likelihood.mean(model.decode(torch.zeros(1, z.shape[1], dtype=torch.float64))).numpy()
    assert np.abs(level_model.from_model_space(expected[None])[0] - back[0]).max() <= 1  # pixel levels, rounded
    error = ((back - held_out) ** 2).mean()
    assert error < ((level_model.from_model_space(at_zero) - held_out) ** 2).mean()
    assert error < 1.05 * ((train.mean(0).round() - held_out) ** 2).mean()  # as good as the data's mean image


def test_latent_codes_are_fitted_below_the_posterior_means_floor(level_model, digits):
    """The decoder's mean at the posterior mean is not the best reconstruction: refined codes go below it."""
    held_out = digits[1]

    def error(step: float, refine_steps: int) -> float:
        params = {"step": step, "refine_steps": refine_steps}
        back = decompress(level_model, compress(level_model, held_out, codec="latent", codec_params=params))
        return float(((back - held_out) ** 2).mean())

    plain = min(error(step, 0) for step in (0.4, 0.1))
    # model seeds 0–3 give 0.78–0.83 (step 0.4) and 0.71–0.75 (step 0.1) × plain: 0.85 had a 0.02 margin on
    # seed 3 (issue 17's audit); the property is "below the floor", asked here with room for other CPUs
    assert error(0.4, 200) < 0.95 * plain and error(0.1, 200) < 0.95 * plain


def test_latent_codec_edge_cases(level_model, digits):
    one = digits[1][:1]
    assert decompress(level_model, compress(level_model, one, codec="latent")).shape == one.shape
    zeros = np.zeros((3, 8, 8))
    coarse = compress(level_model, zeros, codec="latent", codec_params={"step": 9.9})
    assert decompress(level_model, coarse).shape == zeros.shape


@pytest.mark.parametrize(
    "codes",
    [
        np.random.default_rng(0).normal(3, 10, size=(2000, 5)).round().astype(np.int64),
        np.zeros((7, 3), dtype=np.int64),  # one symbol only
        np.array([[3, -2, 0]]),  # one row
        np.c_[np.random.default_rng(1).normal(0, 0.3, 500).round(), np.full(500, 2)],  # a constant column
    ],
)
def test_integer_codes_round_trip(codes):
    side = np.random.default_rng(2).uniform(0.1, 100, size=(2, codes.shape[1]))
    payload = encode_integer_codes(codes, side)
    back, back_side = decode_integer_codes(payload, *codes.shape, side_rows=2)
    assert np.array_equal(back, codes)
    coded = codes.any(axis=0)  # side information travels, as float16, for coded columns only
    assert np.array_equal(back_side[:, coded], side[:, coded].astype(np.float16)) and not back_side[:, ~coded].any()
    assert np.array_equal(decode_integer_codes(encode_integer_codes(codes), *codes.shape)[0], codes)
    if len(codes) == 2000:  # N(3, 10²) rounded: log2(10·√(2πe)) bits per value, plus 1 + 8 bytes and 8 per column
        bound = codes.size * math.log2(10 * math.sqrt(2 * math.pi * math.e))
        assert 8 * len(payload) < 1.01 * bound + 8 * (1 + 8 + 8 * 5) + 32


def test_a_codec_sees_a_coding_model_not_the_estimator(binary_model, digits):
    """Codecs get the public CodingModel (network, latent size, likelihood, element scales), not the estimator."""
    from vaeguard import hookimpl
    from vaeguard.parts import CodingModel
    from vaeguard.plugins import get_plugin_manager

    seen = []

    class RawCodec:
        lossless = True

        def params(self):
            return {}

        def encode(self, model, x):
            seen.append(model)
            return x.numpy().astype(np.uint8).tobytes(), {}

        def decode(self, model, payload, n):
            seen.append(model)
            shape = (n, *model.network.likelihood.event_shape)
            return torch.from_numpy(np.frombuffer(payload, dtype=np.uint8).reshape(shape).astype(np.float64))

    class Plugin:
        @staticmethod
        @hookimpl
        def vaeguard_register_codecs(register):
            register("raw-test", RawCodec)

    pm = get_plugin_manager()
    pm.register(Plugin, name="raw-codec-test")
    try:
        bits = (digits[1][:6] >= 8).astype(np.uint8)
        assert np.array_equal(decompress(binary_model, compress(binary_model, bits, codec="raw-test")), bits)
    finally:
        pm.unregister(name="raw-codec-test")
    assert len(seen) == 2 and all(isinstance(m, CodingModel) for m in seen)
    assert seen[0].network is binary_model.model_ and seen[0].latent_dim == binary_model.latent_dim_


# -- hostile containers (issue 17): every change is caught before decoding, whatever the codec ---------
def _containers(binary_model, level_model, digits):
    bits = (digits[1][:12] >= 8).astype(np.uint8)
    return [
        (binary_model, compress(binary_model, bits)),
        (level_model, compress(level_model, digits[1][:12], codec="latent")),
    ]


def _with_header(blob: bytes, change) -> bytes:
    """``blob`` with its header edited in place by ``change(dict)`` and the container's SHA-256 recomputed (as a
    deliberate edit would), so that only the header's own checks can catch it."""
    import hashlib
    import json
    import struct

    (length,) = struct.unpack("<I", blob[4:8])
    header = json.loads(blob[8 : 8 + length])
    change(header)  # edits the header in place
    encoded = json.dumps(header).encode()
    front = blob[:4] + struct.pack("<I", len(encoded)) + encoded + blob[8 + length : 8 + length + 64]
    payload = blob[8 + length + 96 :]
    return front + hashlib.sha256(front + payload).digest() + payload


def test_any_damage_to_a_container_is_caught_before_decoding(binary_model, level_model, digits):
    rng = np.random.default_rng(0)
    for model, blob in _containers(binary_model, level_model, digits):
        damaged = [blob[:-1], blob[:-4], blob[: len(blob) // 2], blob[:20]]
        for position in rng.choice(len(blob) - 4, 12, replace=False) + 4:  # a flipped bit anywhere after the magic
            flipped = bytearray(blob)
            flipped[position] ^= 1 << int(rng.integers(8))
            damaged.append(bytes(flipped))
        for bad in damaged:
            with pytest.raises(ValueError, match="truncated or altered|header is invalid"):
                decompress(model, bad)


def test_header_fields_are_checked_one_by_one(binary_model, level_model, digits):
    model, blob = _containers(binary_model, level_model, digits)[0]
    for key in ("n_samples", "codec_params", "kind", "shape", "info", "codec", "dtype"):
        with pytest.raises(ValueError, match=f"header is invalid: '{key}' is missing"):
            decompress(model, _with_header(blob, lambda h, key=key: h.pop(key)))
    for change, match in [
        (lambda h: h.update(kind="frame"), "'columns' is missing"),
        (lambda h: h.update(n_samples=-1), "'n_samples' must be"),
        (lambda h: h.update(shape=[5, 8, 8]), "does not start with n_samples"),
        (lambda h: h.update(dtype="O"), "'dtype' must be a numeric dtype"),
        (lambda h: h.update(extra=1), "'extra' is not a known entry"),
    ]:
        with pytest.raises(ValueError, match=match):
            decompress(model, _with_header(blob, change))


def test_a_header_cannot_declare_more_samples_than_memory_holds(binary_model, level_model, digits):
    import time

    model, blob = _containers(binary_model, level_model, digits)[0]
    crafted = _with_header(blob, lambda h: h.update(n_samples=10**11, shape=[10**11, 8, 8]))
    start = time.perf_counter()
    with pytest.raises(ValueError, match="declares 100000000000 samples .* more than this machine's memory"):
        decompress(model, crafted)
    assert time.perf_counter() - start < 5


def test_long_headers_and_version_1_containers(level_model):
    import struct

    rng = np.random.default_rng(0)
    labels = np.array(["red", "green", "blue"])[rng.integers(0, 3, size=(30, 2))]
    frame = pd.DataFrame(labels, columns=["a" * 40_000, "b" * 40_000])
    det = VAEAnomalyDetector(epochs=2, random_state=0, device="cpu").fit(frame)
    blob = compress(det, frame)  # a header over 65 535 bytes
    pd.testing.assert_frame_equal(decompress(det, blob).astype(str), frame)
    # a version 1 container (uint16 header length, no container SHA-256) still decodes
    images = np.asarray(level_model.sample(3))
    v2 = compress(level_model, images, codec="latent")
    (length,) = struct.unpack("<I", v2[4:8])
    v1 = b"VGZ1" + struct.pack("<H", length) + v2[8 : 8 + length + 64] + v2[8 + length + 96 :]
    np.testing.assert_array_equal(decompress(level_model, v1), decompress(level_model, v2))


def test_the_exact_coder_approaches_the_discretised_elbo_within_its_own_error(binary_model, digits):
    """Robust by construction (issue 17): with exactly quantised tables, bits-back's net size is a draw of
    Σ_i [−log₂ P(x_i|ẑ_i) + L·bits + log₂ Q(ẑ_i|x_i)] with ẑ_i ~ Q, the discretised latent's posterior (the
    rounded tables the coder uses). Its mean and spread are sampled here from the model itself, so the bound
    is the estimator's own error (4 standard deviations), not how well the model trained."""
    from vaeguard.components.codecs import LatentBuckets, _symbol_tables, coding_model

    held_out = (digits[1][:60] >= 8).astype(np.uint8)
    blob = compress(binary_model, held_out, codec_params={"exact_tables": True})
    assert np.array_equal(decompress(binary_model, blob), held_out)
    header, _ = read_header(blob)
    assert header["codec_params"]["exact_tables"] is True
    buckets, draws = LatentBuckets(12), 64
    rng = np.random.default_rng(0)
    means, variances = [], []
    with coding_model(binary_model.coding_model()) as model:
        for image in torch.from_numpy(held_out.astype(np.float64)):
            mu, logvar = model.encode(image[None])
            q = buckets.posterior(mu[0], logvar[0])
            q = q / q.sum(axis=1, keepdims=True)
            z = np.stack([rng.choice(buckets.count, size=draws, p=row) for row in q], axis=1)  # (draws, L)
            p = _symbol_tables(model.likelihood, model.decode(buckets.codes(z)))  # (draws, elements, symbols)
            p = p / p.sum(axis=2, keepdims=True)
            symbols = image.reshape(-1).numpy().astype(int)
            data_bits = -np.log2(p[:, np.arange(len(symbols)), symbols]).sum(axis=1)
            code_bits = z.shape[1] * buckets.bits + np.log2(q[np.arange(z.shape[1]), z]).sum(axis=1)
            bits = data_bits + code_bits
            means.append(bits.mean())
            variances.append(bits.var(ddof=1))
    expected, spread = float(np.sum(means)), math.sqrt(np.sum(variances) * (1 + 1 / draws))
    # 64: the ANS state's end (at most two 32-bit words) on one stack
    assert abs(header["info"]["net_bits"] - expected) <= 4 * spread + 64, (header["info"]["net_bits"], expected, spread)
    # the default, fast tables add their quantisation loss: 0.32 bits per image measured (quality log C20); allow 1
    fast = read_header(compress(binary_model, held_out))[0]["info"]["net_bits"]
    assert abs(fast - expected) <= 4 * spread + 64 + 1.0 * len(held_out), (fast, expected, spread)


def test_containers_written_by_an_earlier_version_still_decode():
    """A bits-back container written before the coder's tables changed (tests/data/make_containers.py, the
    commit in containers_written_by.txt): it must decode to the same images with its model file."""
    from pathlib import Path

    data = Path(__file__).parent / "data"
    images = (load_digits().images[200:300] >= 8).astype(np.uint8)
    blob = (data / "digits-bitsback-0.1.vgz").read_bytes()
    assert read_header(blob)[0]["codec_params"]["streams"] == 2
    np.testing.assert_array_equal(decompress(str(data / "digits-bernoulli-0.1.h5"), blob), images)


def test_eight_bit_containers_written_before_the_tables_were_chunked_still_decode():
    """An 8-bit container (16 × 16 digits, discretised logistic, eight stacks) written by the code before the
    logistic tables were computed in place and a few samples at a time (tests/data/make_containers.py): each
    step's eight samples are now two chunks of four, and the container must still decode, to the same images."""
    from pathlib import Path

    from vaeguard.components.codecs import _table_chunks

    data = Path(__file__).parent / "data"
    images = np.kron(load_digits().images[200:300] * 15, np.ones((2, 2))).astype(np.uint8)
    model = load(data / "digits-8bit-0.1.h5")
    assert len(_table_chunks(model.coding_model().network.likelihood, 8)) == 2  # the case the fixture guards
    blob = (data / "digits-8bit-bitsback-0.1.vgz").read_bytes()
    assert read_header(blob)[0]["codec_params"]["streams"] == 8
    np.testing.assert_array_equal(decompress(model, blob), images)
    # and today's code writes the same bits in that format (one group of streams, float64)
    assert compress(model, images, codec_params={"streams": 8, "groups": 1, "precision": "float64"}) == blob


def test_the_default_latent_buckets_code_no_larger_than_finer_ones(binary_model, digits):
    """latent_bits=8 (the default) against 2¹²: the fast table quantisation lets near-empty buckets take mass, so
    16 × 4096 masses per sample cost time and buy no bits (quality log C21: 0.4093 against 0.4118 bits/dim)."""
    held_out = (digits[1] >= 8).astype(np.uint8)
    default = read_header(compress(binary_model, held_out))[0]
    finer = read_header(compress(binary_model, held_out, codec_params={"latent_bits": 12}))[0]
    assert default["codec_params"]["latent_bits"] == 8
    # net bits come in the coder's 32-bit words: allow the end of one stack's state (two words), as above
    assert default["info"]["net_bits"] <= finer["info"]["net_bits"] + 64, (default["info"], finer["info"])


def test_symbol_tables_round_in_place_only_tables_of_their_own():
    """The coder rounds a likelihood's table in place when the table owns its memory; a table that a plugin keeps
    (a buffer, or a view of one) must come back rounded and be left untouched."""
    from vaeguard.components.codecs import PROBABILITY_GRID, _symbol_tables

    class KeptTable(torch.nn.Module):
        n_symbols = 3

        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("table", torch.tensor([[0.1, 0.2, 0.7]], dtype=torch.float64) / 3.0)

        def symbol_probabilities(self, params: torch.Tensor) -> torch.Tensor:
            return self.table if len(params) == 1 else self.table.expand(len(params), 3)

    likelihood = KeptTable()
    before = likelihood.table.clone()
    for rows in (1, 2):
        tables = _symbol_tables(likelihood, torch.zeros(rows, 1, dtype=torch.float64))
        np.testing.assert_array_equal(tables[0, 0], np.round(before[0].numpy() / PROBABILITY_GRID) * PROBABILITY_GRID)
    assert torch.equal(likelihood.table, before)


def test_probability_rounding_is_the_numpy_formula_to_the_bit():
    """The coder's float64 tables are rounded in torch (adding and subtracting 1.5 · 2¹²) where they were rounded
    by np.round(p / grid) * grid: the same bits over [0, 1], ties included (both round half to even), or containers
    written before would not decode; and a table rounded not in place is left as it was."""
    from vaeguard.components.codecs import PROBABILITY_GRID, _rounded

    rng = np.random.default_rng(0)
    for scale in (1.0, 1e-6, 1e-12, 1e-15):
        p = rng.random(50_000) * scale
        p[:500] = (rng.integers(0, 2**20, 500) + 0.5) * PROBABILITY_GRID  # exact ties
        p[500:1000] = 1.0 - (rng.integers(0, 2**20, 500) + 0.5) * PROBABILITY_GRID  # ties just below one
        p[1000:1004] = (0.0, 1.0, PROBABILITY_GRID / 2, 1.0 - PROBABILITY_GRID / 2)
        expected = np.round(p / PROBABILITY_GRID) * PROBABILITY_GRID
        before = p.copy()
        np.testing.assert_array_equal(_rounded(torch.from_numpy(p)), expected)
        np.testing.assert_array_equal(p, before)
        np.testing.assert_array_equal(_rounded(torch.from_numpy(p.copy()), in_place=True), expected)


def test_stream_groups_split_the_streams_into_contiguous_even_blocks():
    from vaeguard.components.codecs import stream_groups

    assert stream_groups(10, 2) == [range(0, 5), range(5, 10)]
    assert stream_groups(7, 3) == [range(0, 3), range(3, 5), range(5, 7)]
    assert stream_groups(2, 5) == [range(0, 1), range(1, 2)]  # never an empty group
    for streams, groups in ((1, 1), (64, 2), (13, 4)):
        blocks = stream_groups(streams, groups)
        assert [s for block in blocks for s in block] == list(range(streams))
        assert max(map(len, blocks)) - min(map(len, blocks)) <= 1


def test_groups_and_precision_are_part_of_the_container_and_threads_are_not(
    binary_model, level_model, digits, monkeypatch
):
    """The default codes in float32; groups of streams run each on a thread: the container says how many and in
    what precision; the bits are the same when the groups run one after the other (one CPU), and decode either way;
    float64 and one group is the format of containers written before groups existed, and is stored as nothing.
    "auto" groups only large samples (28 × 28 images), whose work outside the GIL the threads share."""
    from vaeguard.components import codecs

    auto = codecs.BitsBackCodec()
    assert auto.group_count(20, 784) == 2 and auto.group_count(1, 784) == 1 and auto.group_count(20, 64) == 1
    bits = (digits[1][:60] >= 8).astype(np.uint8)
    levels = digits[1][:60]
    for model, data in ((binary_model, bits), (level_model, levels)):
        params = read_header(compress(model, data, codec_params={"streams": 6}))[0]["codec_params"]
        assert "groups" not in params and params["precision"] == "float32"  # small images: one group
        blob = compress(model, data, codec_params={"streams": 6, "groups": 2})
        assert read_header(blob)[0]["codec_params"]["groups"] == 2
        monkeypatch.setattr(codecs, "available_cpus", lambda: 1)
        assert compress(model, data, codec_params={"streams": 6, "groups": 2}) == blob
        np.testing.assert_array_equal(decompress(model, blob), data)
        monkeypatch.undo()
        np.testing.assert_array_equal(decompress(model, blob), data)
        legacy = compress(model, data, codec_params={"streams": 6, "groups": 1, "precision": "float64"})
        params = read_header(legacy)[0]["codec_params"]
        assert "groups" not in params and "precision" not in params
        np.testing.assert_array_equal(decompress(model, legacy), data)
        three = compress(model, data, codec_params={"streams": 7, "groups": 3, "precision": "float64"})
        assert read_header(three)[0]["codec_params"]["groups"] == 3
        np.testing.assert_array_equal(decompress(model, three), data)
    for bad, match in (
        ({"groups": 0}, r"groups must be .auto. or an integer in \[1, 4096\]"),
        ({"groups": True}, r"groups must be .auto. or an integer"),
        ({"precision": "float16"}, r"precision must be one of \['auto', 'float32', 'float64'\]"),
    ):
        with pytest.raises(ValueError, match=match):
            compress(binary_model, bits, codec_params=bad)


def test_a_failing_group_stops_the_others_and_its_error_is_raised():
    import threading
    import time

    from vaeguard.components.codecs import run_groups

    steps = {0: 0, 1: 0}

    def work(group: range, stop: threading.Event) -> None:
        if group.start == 0:
            time.sleep(0.05)
            raise ValueError("the compressed data is damaged")
        while not stop.is_set() and steps[1] < 10_000:  # a group that would run for minutes
            steps[1] += 1
            time.sleep(0.01)

    with pytest.raises(ValueError, match="damaged"):
        run_groups(work, [range(0, 1), range(1, 2)], threads=2)
    assert steps[1] < 10_000  # stopped at its next step, not after its 10 000


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_group_on_a_thread_of_its_own_computes_what_the_calling_thread_does(dtype):
    """A new thread's BLAS uses every CPU unless told otherwise, and rounds some products otherwise: a 198-wide
    layer's output differed between a fresh thread and the caller (found on a categorical table's decoder with
    two groups, which then did not decode). run_groups gives each group's thread one torch thread."""
    from vaeguard.components.codecs import run_groups

    torch.manual_seed(0)
    layer = torch.nn.Linear(198, 198).to(dtype)
    x = torch.randn(8, 198, dtype=dtype)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            expected = layer(x)
        got = {}

        def work(group: range, stop) -> None:
            got[group.start] = layer(x)

        run_groups(work, [range(0, 1), range(1, 2)], threads=2)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(got[0], expected) and torch.equal(got[1], expected)


def test_large_8_bit_images_code_on_two_groups_by_default_and_round_trip(monkeypatch):
    """Samples of 512 values or more (here 24 × 24 8-bit images, a convolutional model) take two groups of stacks
    by default, in float32, their tables a few images at a time; the bits are those of the groups run one after
    the other."""
    from vaeguard.components import codecs

    rng = np.random.default_rng(0)
    base = np.kron(load_digits().images[:60] * 15, np.ones((3, 3)))  # 24 × 24, levels 0..240
    images = np.clip(base + rng.integers(0, 8, base.shape), 0, 255).astype(np.uint8)
    model = VAEAnomalyDetector(epochs=2, random_state=0, device="cpu", n_importance_samples=4).fit(images[:40])
    assert model.model_spec_["likelihood"] == "discretized_logistic" and model.model_spec_["encoder"] == "conv"
    held_out = images[40:]
    blob = compress(model, held_out, codec_params={"streams": 4})
    params = read_header(blob)[0]["codec_params"]
    assert params["groups"] == 2 and params["precision"] == "float32"
    assert len(codecs._table_chunks(model.coding_model().network.likelihood, 2, torch.float32)) == 1
    np.testing.assert_array_equal(decompress(model, blob), held_out)
    monkeypatch.setattr(codecs, "available_cpus", lambda: 1)
    assert compress(model, held_out, codec_params={"streams": 4}) == blob
