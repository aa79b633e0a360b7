"""The hqq and gptq quantizers against round-to-nearest.

Letters: T tokens, H hidden, I intermediate, K / N in / out features of one projection, B block.
"""

import numpy as np
import onnxruntime as ort
import pytest

from dymoe.toolchain.blockquant import dequantize, quantize_rtn
from dymoe.toolchain.expert_graph import build_expert_model, reference_forward
from dymoe.toolchain.expert_weights import expert_weights, quantized_matrices
from dymoe.toolchain.gptq import GptqOptions, quantize_gptq
from dymoe.toolchain.hqq import HqqOptions, quantize_hqq
from dymoe.toolchain.quantizers import QuantizerOptions, quantize_expert, routed_output_error

B = 32


def _block_errors(w, qm, salience):
    """hqq's objective per (block, column) [nb, N]: squared error weighted by 1 + salience * w^2 / mean(w^2)."""
    K, N = w.shape
    pad = (-K) % B
    w64 = np.concatenate([w, np.zeros((pad, N), np.float32)]) if pad else w
    d = np.concatenate([dequantize(qm), np.zeros((pad, N), np.float32)]) if pad else dequantize(qm)
    blocks = w64.astype(np.float64).reshape(-1, B, N)
    sq = ((d - w64).astype(np.float64) ** 2).reshape(-1, B, N)
    if pad:  # the short last block's statistics cover its real rows only
        blocks, sq = blocks.copy(), sq.copy()
    mean = (blocks ** 2).sum(axis=1, keepdims=True) / np.array([B] * (blocks.shape[0] - 1) + [B - pad])[:, None, None]
    mean[mean == 0] = 1.0
    return ((1 + salience * blocks ** 2 / mean) * sq).sum(axis=1)


def _matrices():
    rng = np.random.default_rng(0)
    gauss = rng.standard_normal((96, 40)).astype(np.float32)
    outliers = gauss.copy()
    outliers[rng.integers(0, 96, 12), rng.integers(0, 40, 12)] *= 12
    short = rng.standard_normal((70, 24)).astype(np.float32)  # last block has 6 rows
    zeros = np.zeros((64, 8), dtype=np.float32)
    positive = np.abs(gauss[:64, :8]) + 1.0  # 0 is outside the data: the range still includes it
    return {"gauss": gauss, "outliers": outliers, "short": short, "zeros": zeros, "positive": positive}


@pytest.mark.parametrize("salience", [0.0, 4.0])
@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("name", list(_matrices()))
def test_hqq_never_worse_than_rtn_in_any_block(name, bits, salience):
    w = _matrices()[name]
    rtn, hqq = quantize_rtn(w, bits, B), quantize_hqq(w, bits, B, HqqOptions(salience=salience, unbiased=False))
    assert hqq.q.shape == w.shape and hqq.scale.shape == rtn.scale.shape
    assert hqq.q.max() <= (1 << bits) - 1 and hqq.zero_point.max() <= (1 << bits) - 1
    assert np.all(hqq.scale > 0)
    assert np.all(_block_errors(w, hqq, salience) <= _block_errors(w, rtn, salience) * (1 + 1e-5) + 1e-12)
    if name == "zeros":
        assert np.all(dequantize(hqq) == 0)


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("name", ["gauss", "outliers", "short"])
def test_hqq_is_unbiased(name, bits):
    """The final rescaling keeps each (block, column)'s projection on the original: <w_q, w> = <w, w>
    (a least-squares fit alone shrinks the weights)."""
    w = _matrices()[name]
    K, N = w.shape
    pad = (-K) % B

    def per_block(a, b):
        prod = (a.astype(np.float64) * b)
        prod = np.concatenate([prod, np.zeros((pad, N))]) if pad else prod
        return prod.reshape(-1, B, N).sum(axis=1)

    energy = per_block(w, w)
    for unbiased in (True, False):
        wq = dequantize(quantize_hqq(w, bits, B, HqqOptions(unbiased=unbiased)))
        ratio = per_block(wq, w) / energy
        if unbiased:
            np.testing.assert_allclose(ratio, 1.0, rtol=1e-5)
        elif bits == 2:
            assert ratio.mean() < 0.99  # the shrinkage (clipped ranges) the rescaling removes


@pytest.mark.parametrize("bits", [4, 2])
def test_hqq_beats_rtn_on_weights_with_outliers(bits):
    w = _matrices()["outliers"]
    rel = [np.linalg.norm(dequantize(q(w, bits, B)) - w) / np.linalg.norm(w) for q in (quantize_rtn, quantize_hqq)]
    assert rel[1] < {4: 0.99, 2: 0.95}[bits] * rel[0]  # 16 levels leave less to gain than 4


def test_hqq_iterations_refine_the_range_search():
    w = _matrices()["gauss"]
    search_only = quantize_hqq(w, 2, B, HqqOptions(iters=0))
    full = quantize_hqq(w, 2, B, HqqOptions(iters=20))
    assert np.linalg.norm(dequantize(full) - w) < np.linalg.norm(dequantize(search_only) - w)


def _gaussian_with_outliers(K=160, N=96, seed=5):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((N, K), dtype=np.float32) * 0.02  # torch layout [N, K]
    w.reshape(-1)[rng.integers(0, w.size, w.size // 100)] *= 10
    return w


@pytest.mark.parametrize("salience", [0.0, 4.0])
@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("name", [*_matrices(), "wide"])
def test_hqq_pruning_keeps_the_full_searchs_picks(name, bits, salience):
    """Candidates skipped by the lower bound could not have won: the pruned search picks exactly
    what scoring every candidate on every (block, column) picks."""
    w = _gaussian_with_outliers().T if name == "wide" else _matrices()[name]
    full = quantize_hqq(w, bits, B, HqqOptions(salience=salience, prune=False))
    pruned = quantize_hqq(w, bits, B, HqqOptions(salience=salience))
    np.testing.assert_array_equal(pruned.q, full.q)
    np.testing.assert_array_equal(pruned.scale, full.scale)
    np.testing.assert_array_equal(pruned.zero_point, full.zero_point)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_hqq_takes_either_memory_layout(bits):
    """A transposed torch weight (no copy) and a contiguous [K, N] matrix give the same codes."""
    w_torch = _gaussian_with_outliers(K=150)  # a short last block too
    view, contiguous = quantize_hqq(w_torch.T, bits, B), quantize_hqq(np.ascontiguousarray(w_torch.T), bits, B)
    for a, b in ((view.q, contiguous.q), (view.scale, contiguous.scale), (view.zero_point, contiguous.zero_point)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(dequantize(view), dequantize(contiguous))


# The default quantizer's errors on a seeded expert (K = 300 and 80: short last blocks too), as the
# implementation before the pruned, cache-sized search measured them (commit 230835b): the faster
# search must not be worse anywhere.
BEFORE = {("int8", 32): (0.0054453320994546995, 0.009980840608477592),
          ("int8", 64): (0.006922880882150177, 0.011711923405528069),
          ("int4", 32): (0.092841557892315, 0.16295607388019562),
          ("int4", 64): (0.11773844458252826, 0.21507935225963593),
          ("int2", 32): (0.37850488878521005, 0.680436372756958),
          ("int2", 64): (0.4629623835737756, 0.8525159955024719)}


@pytest.mark.parametrize("precision,block", list(BEFORE))
def test_hqq_errors_are_no_worse_than_before(precision, block):
    rng = np.random.default_rng(7)
    H, I = 300, 80
    gate, up = (rng.standard_normal((I, H), dtype=np.float32) * 0.02 for _ in range(2))
    down = rng.standard_normal((H, I), dtype=np.float32) * 0.02
    for w in (gate, up, down):
        w.reshape(-1)[rng.integers(0, w.size, w.size // 200)] *= 10
    quant = quantize_expert(gate, up, down, precision, block, QuantizerOptions("hqq"))
    _, stats = build_expert_model(gate, up, down, precision, block, quantized=quant.mats,
                                  fmt="nbits" if precision == "int2" else None)
    weight, output = BEFORE[(precision, block)]
    assert stats.weight_rel_error <= weight * (1 + 1e-6)
    assert stats.output_rel_error <= output * (1 + 1e-6)


def test_hqq_picks_exactly_what_it_picked_before():
    """Codes, scales and zero points of seeded matrices (short last blocks, zero blocks, outliers;
    8, 4 and 2 bits; blocks of 32 and 64), hashed: the bytes the implementation before the pruned,
    cache-sized search wrote (commit 230835b). Same arithmetic, same order of every sum: the same
    picks, not merely as good ones."""
    import hashlib

    rng = np.random.default_rng(11)
    h = hashlib.sha256()
    for K, N in ((300, 80), (80, 300), (256, 96)):
        w = rng.standard_normal((N, K), dtype=np.float32) * 0.02  # torch layout
        w.reshape(-1)[rng.integers(0, w.size, w.size // 100)] *= 10
        w[:3, :40] = 0.0
        for bits in (8, 4, 2):
            for block in (32, 64):
                qm = quantize_hqq(w.T, bits, block)
                for a in (qm.q, qm.scale, qm.zero_point):
                    h.update(np.ascontiguousarray(a).tobytes())
    assert h.hexdigest() == "c349dc3148de6494ea5e32dde659d47b14ab6fe2412cf055d1e0c015ee6e1729"


def test_a_memo_shared_by_an_experts_variants_changes_nothing():
    """The export passes one memo through all precisions of an expert (hqq's per-matrix work, the
    statistics' float reference): every variant is byte for byte what it is without one."""
    rng = np.random.default_rng(8)
    H, I = 96, 80
    weights = (rng.standard_normal((I, H), dtype=np.float32), rng.standard_normal((I, H), dtype=np.float32),
               rng.standard_normal((H, I), dtype=np.float32))
    memo: dict = {}
    for precision in ("fp16", "int8", "int4", "int2", "int4"):
        built = []
        for m in (memo, None):
            quant = quantize_expert(*weights, precision, B, QuantizerOptions("hqq"), memo=m) if precision != "fp16" \
                else None
            model, stats = build_expert_model(*weights, precision, B, quantized=quant.mats if quant else None, memo=m,
                                              fmt="nbits" if precision == "int2" else None)
            built.append((model.SerializeToString(), stats))
        assert built[0] == built[1]
    assert {"gate", "up", "down", "probe reference"} <= set(memo)


def test_gptq_without_correlations_is_the_data_free_quantizer():
    """A diagonal X^T X gives no other row to move the error to: GPTQ quantizes each row alone, with
    the block parameters fitted by the data-free optimiser, i.e. exactly hqq."""
    w = _matrices()["short"]
    hs = np.diag(np.random.default_rng(1).uniform(0.5, 2.0, w.shape[0]))
    # a fixed number of iterations (hqq's early stop looks at many blocks at once), and no rescaling
    # after the codes are chosen (gptq rounds each row with the final scale)
    fixed = HqqOptions(tol=-1.0, unbiased=False)
    g, h = quantize_gptq(w, 4, B, hs, GptqOptions(params=fixed)), quantize_hqq(w, 4, B, fixed)
    np.testing.assert_array_equal(g.q, h.q)
    np.testing.assert_array_equal(g.scale, h.scale)


def _correlated(rng, K, rank=8, outlier_channels=(3, 17), noise=0.1):
    """A sampler of low-rank inputs ``[T, K]`` with a few large channels, as real hidden states have."""
    mix = rng.standard_normal((rank, K)).astype(np.float32)

    def draw(T):
        x = rng.standard_normal((T, rank)).astype(np.float32) @ mix
        x += noise * rng.standard_normal((T, K)).astype(np.float32)
        x[:, list(outlier_channels)] *= 8.0
        return x
    return draw


@pytest.mark.parametrize("bits", [4, 2])
def test_gptq_uses_the_inputs(bits):
    rng = np.random.default_rng(2)
    K, N = 96, 48
    w = rng.standard_normal((K, N)).astype(np.float32)
    draw = _correlated(rng, K)
    x, held = draw(512), draw(256)
    errs = {}
    for name, qm in (("rtn", quantize_rtn(w, bits, B)), ("hqq", quantize_hqq(w, bits, B)),
                     ("gptq", quantize_gptq(w, bits, B, x.T.astype(np.float64) @ x))):
        errs[name] = np.linalg.norm(held @ dequantize(qm) - held @ w) / np.linalg.norm(held @ w)
    assert errs["gptq"] < 0.6 * errs["rtn"] and errs["gptq"] < 0.6 * errs["hqq"], errs


@pytest.fixture(scope="module")
def outlier_expert():
    """A SwiGLU expert with known outliers: a few weights 10x larger than the rest, and inputs with
    two channels 8x larger than the rest (plus low-rank structure, as real hidden states have).
    Inputs for the quantizer and held-out inputs are drawn from the same distribution."""
    rng = np.random.default_rng(3)
    H, I = 128, 64
    gate, up = (rng.standard_normal((I, H)).astype(np.float32) / np.sqrt(H) for _ in range(2))
    down = rng.standard_normal((H, I)).astype(np.float32) / np.sqrt(I)
    for w in (gate, up, down):
        idx = rng.choice(w.size, 10, replace=False)
        w.flat[idx] *= 10.0
    draw = _correlated(rng, H)
    return (gate, up, down), draw(768), draw(256)


@pytest.mark.parametrize("precision", ["int4", "int2"])
def test_hqq_and_gptq_beat_rtn_on_an_expert_with_outliers(outlier_expert, precision):
    weights, x, held = outlier_expert
    err = {}
    for name in ("rtn", "hqq", "gptq"):
        quant = quantize_expert(*weights, precision, B, QuantizerOptions(name), inputs=x)
        assert quant.quantizer == name and quant.note is None and quant.tokens == x.shape[0]
        err[name] = routed_output_error(held, *weights, quant.mats)  # held-out tokens, not the ones fitted on
    # data-free, hqq can only pick better ranges: a few % at int4, more at int2
    assert err["hqq"] < {"int4": 0.99, "int2": 0.95}[precision] * err["rtn"], err
    assert err["gptq"] < 0.7 * err["rtn"] and err["gptq"] < err["hqq"], err


@pytest.mark.parametrize("tokens,min_tokens,expected", [
    (None, 64, "hqq"),  # no inputs at all
    (10, 64, "hqq"),  # too few routed tokens
    (64, 64, "gptq"),  # exactly enough
])
def test_gptq_falls_back_to_hqq_without_enough_tokens(outlier_expert, tokens, min_tokens, expected):
    weights, x, _ = outlier_expert
    inputs = None if tokens is None else x[:tokens]
    quant = quantize_expert(*weights, "int4", B, QuantizerOptions("gptq", min_tokens=min_tokens), inputs=inputs)
    assert quant.quantizer == expected
    if expected == "hqq":
        assert "fell back to hqq" in quant.note and f"{tokens or 0} routed" in quant.note
        hqq = quantize_expert(*weights, "int4", B, QuantizerOptions("hqq"))
        for p in ("gate", "up", "down"):
            np.testing.assert_array_equal(quant.mats[p].q, hqq.mats[p].q)
    else:
        assert quant.note is None


@pytest.mark.parametrize("precision", ["int8", "int4", "int2"])
def test_graph_computes_with_the_quantizers_codes(outlier_expert, precision):
    """Whatever chose the codes, the ONNX graph stores them and ORT computes x @ dequantize(codes)."""
    weights, x, held = outlier_expert
    quant = quantize_expert(*weights, precision, B, QuantizerOptions("gptq"), inputs=x)
    model, stats = build_expert_model(*weights, precision, B, quantized=quant.mats, accuracy_level=0)
    stored = quantized_matrices(model)
    for p in ("gate", "up", "down"):
        np.testing.assert_array_equal(stored[p].q, quant.mats[p].q)
        np.testing.assert_array_equal(stored[p].scale, quant.mats[p].scale)
        np.testing.assert_array_equal(stored[p].zero_point, quant.mats[p].zero_point)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    y = sess.run(None, {"x": held})[0]
    ref = reference_forward(held, *expert_weights(model))
    assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < 1e-5
    rtn_stats = build_expert_model(*weights, precision, B)[1]  # round-to-nearest codes
    assert stats.weight_rel_error > 0 and stats.weight_rel_error != rtn_stats.weight_rel_error


def test_quantized_matrix_must_match_the_precision(outlier_expert):
    weights, _, _ = outlier_expert
    quant = quantize_expert(*weights, "int4", B, QuantizerOptions("rtn"))
    with pytest.raises(ValueError, match="expected 2-bit"):
        build_expert_model(*weights, "int2", B, quantized=quant.mats)
