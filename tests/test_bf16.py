"""bf16 precision: rounding, the packed layouts the bf16 paths read, rg_gemm_bf16 on every
bf16 path against float64 on bf16-rounded operands, the bf16 training step and generation
against fp32, and the fp32 | bf16 | auto setting."""

import logging

import numpy as np
import pytest

from rustgpt import _kernels as K
from rustgpt import generation, precision
from rustgpt.config import ConfigError, GenerationConfig, ModelConfig, TrainingConfig
from rustgpt.errors import ValidationError
from rustgpt.model import LLM
from rustgpt.optim import Adam
from rustgpt.step import TrainStep
from tests import reference as ref
from tests.native import run_c_test
from tests.test_kernels_gemm import SHAPES, TRANS, _operands
from tests.test_step import batches, vocab

BF16_PATHS = ("portable", "avx512bf16", "amx")
WHY = {"avx512bf16": "this CPU has no AVX512-BF16 (CPUID.(7,1):EAX bit 5)",
       "amx": "this CPU has no AMX-BF16 (or Linux refused the tile state)"}
BEST = K.bf16_paths()[-1]
SMALL_M = 16  # rg_gemm_bf16 reads a weight copy in place for at most this many rows
SIZES = dict(embedding_dim=32, hidden_dim=64, num_layers=2, num_heads=2, max_seq_len=12)


@pytest.fixture(params=BF16_PATHS)
def bf16(request):
    """Run the test once per bf16 path; a path this CPU lacks is skipped, saying why."""
    if request.param not in K.bf16_paths():
        pytest.skip(WHY[request.param])
    K.set_bf16(request.param)
    yield request.param
    K.set_bf16(BEST)


@pytest.fixture
def told(monkeypatch):
    """precision.resolve logs each setting once per process: as if for the first time."""
    monkeypatch.setattr(precision, "_told", set())


def gemm_bf16(C, A, B, **options):
    """sgemm in bf16, every operand rounded as it is packed."""
    with K.Bf16Matmuls():
        K.sgemm(C, A, B, **options)


# ---- rounding and layouts -------------------------------------------------------------------

def test_to_bf16_rounds_to_nearest_even(rng):
    """Ties go to the even neighbour, above a tie up, NaN stays NaN, the largest floats
    overflow to infinity; random values as the float64 reference rounds them."""
    one = 1.0
    special = np.array([one, one + 2**-8, one + 3 * 2**-8, one + 2**-8 + 2**-20, -one - 2**-8,
                        np.inf, -np.inf, np.nan, np.finfo(np.float32).max, 1e-40, -0.0, 0.0],
                       np.float32)
    expected = [one, one, one + 2**-6, one + 2**-7, -one, np.inf, -np.inf, np.nan, np.inf,
                ref.bf16(np.float32(1e-40)), -0.0, 0.0]
    x = np.concatenate([special, rng.standard_normal(1000).astype(np.float32) * 1e3])
    out = np.empty(x.shape, np.uint16)
    K.to_bf16(out, x)
    got = (out.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    np.testing.assert_array_equal(got[:len(special)], expected)
    np.testing.assert_array_equal(got, ref.bf16(x))
    assert np.signbit(got[10]) and not np.signbit(got[11])


@pytest.mark.parametrize("M,Kd,N", [(1, 1, 1), (7, 33, 45), (33, 70, 64), (13, 129, 100)])
@pytest.mark.parametrize("trans_a,trans_b", TRANS)
def test_packed_layouts(simd, rng, M, Kd, N, trans_a, trans_b):
    """rg_bf16_pack_a / _b as the header states them: A as bf16 rows of K rounded up to 32,
    B in 32-column panels of (even k, odd k) pairs, zeros in the padding; B's bf16 copy
    packs to the same bits."""
    A, B = _operands(rng, M, Kd, N, trans_a, trans_b)
    Kp = -(-Kd // 32) * 32
    for mr in (4, 12, 32):
        packed = K.bf16_pack_a(A, trans_a, mr)
        expected = np.zeros((-(-M // mr) * mr, Kp))
        expected[:M, :Kd] = ref.bf16(A.T if trans_a else A)
        np.testing.assert_array_equal((packed.astype(np.uint32) << 16).view(np.float32),
                                      expected)
    packed = K.bf16_pack_b(B, trans_b)
    opb = np.zeros((Kp, -(-N // 32) * 32))
    opb[:Kd, :N] = ref.bf16(B.T if trans_b else B)
    expected = opb.reshape(Kp // 2, 2, -1, 32).transpose(2, 0, 3, 1)  # [c, q, j, r]
    np.testing.assert_array_equal((packed.astype(np.uint32) << 16).view(np.float32), expected)
    copy = np.empty(B.shape, np.uint16)
    K.to_bf16(copy, B)
    np.testing.assert_array_equal(K.bf16_pack_b(B, trans_b, Bh=copy), packed)


def test_packed_layouts_feed_the_instructions(rng):
    """The instructions' view of the packed operands, emulated in numpy as the AVX512-BF16
    and AMX kernels address them, gives op(A) @ op(B): vdpbf16ps adds a[2q] b[q, j, 0] +
    a[2q+1] b[q, j, 1] in lane j; a tdpbf16ps takes A tiles of 16 rows x 32 values of k at
    a row stride of Kp, B tiles of 16 pair rows from q = k/2 at a stride of 64 values,
    columns 16-31 starting 32 values in. (Runs anywhere: the layout the hardware paths
    read, checked where they cannot run.)"""
    M, Kd, N = 32, 70, 32  # one 32 x 32 AMX tile of C; K padded to 96
    A, B = _operands(rng, M, Kd, N, False, False)
    to_f = lambda h: (h.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    ap, bp = K.bf16_pack_a(A, False, 32), K.bf16_pack_b(B, False)
    Kp = ap.shape[1]
    a, b = to_f(ap).reshape(-1), to_f(bp).reshape(-1)  # flat, as the kernels index them
    expected = ref.matmul_bf16(A, B)
    # vdpbf16ps: row i's pair broadcast, vector h of B's pairs (columns 16h..16h+15)
    lanes = np.zeros((M, N))
    for q in range(Kp // 2):
        pairs = b[q * 64:(q + 1) * 64].reshape(32, 2)  # [j, r]
        for i in range(M):
            lanes[i] += a[i * Kp + 2 * q] * pairs[:, 0] + a[i * Kp + 2 * q + 1] * pairs[:, 1]
    ref.assert_close(lanes, expected, 1e-12, 1e-12, "vdpbf16ps lanes")
    # tdpbf16ps: C tile (m, n) += A tile m (16 x 32) . B tile n (16 pair rows x 16 pairs)
    tiles = np.zeros((M, N))
    for k in range(0, Kp, 32):
        for m in range(2):
            at = np.stack([a[(16 * m + r) * Kp + k:(16 * m + r) * Kp + k + 32] for r in range(16)])
            for n in range(2):
                start = (k // 2) * 64 + 32 * n
                bt = np.stack([b[start + 64 * r:start + 64 * r + 32] for r in range(16)])
                tiles[16 * m:16 * m + 16, 16 * n:16 * n + 16] += (
                    at.reshape(16, 16, 2)[:, :, None, :] * bt.reshape(16, 16, 2)[None]).sum((1, 3))
    ref.assert_close(tiles, expected, 1e-12, 1e-12, "tdpbf16ps tiles")


def test_bf16_kernels_with_their_instructions_emulated(tmp_path):
    """The AVX512-BF16 and AMX kernels, and the few-rows path's 16-lane variant, run on any
    x86 CPU with their instructions emulated in C (tests/bf16_emulated.c, which also checks
    the tile configuration): rg_gemm_bf16 on each path against float64 over tile, panel and
    block edges, both transposes, accumulate, the bf16 copy, 1 and 2 threads."""
    out = run_c_test(tmp_path, "bf16_emulated", "runtime.c", "elementwise.c")
    assert "avx512bf16: largest relative error" in out and "amx:" in out


# ---- rg_gemm_bf16 -----------------------------------------------------------------------------

def _check(C, expected, Kd, name):
    # bf16 products are exact in float32: only the float32 sums round, as sgemm's do
    tol = 4e-6 * np.sqrt(Kd)
    ref.assert_close(C, expected, tol, tol * 4, name)


@pytest.mark.parametrize("M,Kd,N", SHAPES)
@pytest.mark.parametrize("trans_a,trans_b", TRANS)
def test_gemm_bf16(bf16, simd, rng, M, Kd, N, trans_a, trans_b):
    """C = op(A) @ op(B) and C += ... on bf16-rounded operands, against float64; B read
    from its bf16 copy gives the same bits as B rounded while packed."""
    A, B = _operands(rng, M, Kd, N, trans_a, trans_b)
    expected = ref.matmul_bf16(A, B, trans_a, trans_b)
    C = np.full((M, N), np.nan, np.float32)
    gemm_bf16(C, A, B, trans_a=trans_a, trans_b=trans_b)
    _check(C, expected, Kd, f"C[{bf16}, {simd}]")
    C0 = rng.standard_normal((M, N)).astype(np.float32)
    acc = C0.copy()
    gemm_bf16(acc, A, B, trans_a=trans_a, trans_b=trans_b, accumulate=True)
    _check(acc, expected + C0, Kd, f"C[{bf16}, {simd}, accumulate]")
    from_copy = _from_copy(A, B, trans_a, trans_b)
    if M > SMALL_M:
        np.testing.assert_array_equal(from_copy, C)
    else:
        _check(from_copy, expected, Kd, f"C[{bf16}, {simd}, from the copy]")


def _from_copy(A, B, trans_a, trans_b, C=None):
    """C (+)= op(A) @ op(B) in bf16 with B inside a model's values, so read from their
    bf16 copy; a new C when C is None."""
    values = np.concatenate([np.full(5, 7.0, np.float32), B.reshape(-1)])
    copy = np.empty(values.size, np.uint16)
    K.to_bf16(copy, values)
    out = np.full((A.shape[1] if trans_a else A.shape[0],
                   B.shape[0] if trans_b else B.shape[1]), np.nan, np.float32) if C is None else C
    with K.Bf16Matmuls(values, copy):
        K.sgemm(out, A, values[5:].reshape(B.shape), trans_a=trans_a, trans_b=trans_b,
                accumulate=C is not None)
    return out


@pytest.mark.parametrize("M", [1, 3, 4, 5, 16])
@pytest.mark.parametrize("Kd,N", [(1, 1), (7, 45), (128, 100), (600, 33), (1100, 130)])
@pytest.mark.parametrize("trans_a,trans_b", TRANS)
def test_gemm_bf16_few_rows_read_the_copy(simd, rng, set_threads, M, Kd, N, trans_a, trans_b):
    """Up to SMALL_M rows times a weight copy (decoding), read in place on every CPU: against
    float64 on bf16-rounded operands, written and accumulated, k in blocks past 512, the
    same bits on 1 and 2 threads."""
    A, B = _operands(rng, M, Kd, N, trans_a, trans_b)
    expected = ref.matmul_bf16(A, B, trans_a, trans_b)
    out = []
    for n in (1, 2):
        set_threads(n)
        out.append(_from_copy(A, B, trans_a, trans_b))
    _check(out[0], expected, Kd, f"C[{simd}]")
    np.testing.assert_array_equal(out[1], out[0])
    C0 = rng.standard_normal((M, N)).astype(np.float32)
    _check(_from_copy(A, B, trans_a, trans_b, C0.copy()), expected + C0, Kd,
           f"C[{simd}, accumulate]")


@pytest.mark.parametrize("activation", [None, "relu", "gelu"])
def test_gemm_bf16_epilogue(bf16, rng, activation):
    """bias, pre and the activation after the bf16 product: the bits of bias_add and
    relu_forward / gelu_forward on it."""
    A, B = _operands(rng, 45, 70, 100, False, False)
    bias = rng.standard_normal(100).astype(np.float32)
    C, pre = np.empty((45, 100), np.float32), np.empty((45, 100), np.float32)
    gemm_bf16(C, A, B, bias=bias, activation=activation, pre=pre)
    plain = np.empty_like(C)
    gemm_bf16(plain, A, B)
    K.bias_add(plain, bias)
    np.testing.assert_array_equal(pre, plain)
    if activation == "relu":
        K.relu_forward(plain, plain)
    elif activation == "gelu":
        K.gelu_forward(plain, plain)
    np.testing.assert_array_equal(C, plain)


def test_gemm_bf16_threads_and_sgemm_many(bf16, rng, set_threads):
    """The same bits on 1 and 2 threads; sgemm_many in bf16 = its products one by one,
    a C that recurs accumulating in order."""
    A, B = _operands(rng, 200, 300, 150, False, True)
    out = []
    for n in (1, 2):
        set_threads(n)
        C = np.empty((200, 150), np.float32)
        gemm_bf16(C, A, B, trans_b=True)
        out.append(C)
    np.testing.assert_array_equal(out[0], out[1])
    B2 = rng.standard_normal(B.shape).astype(np.float32)
    many = np.empty((200, 150), np.float32)
    with K.Bf16Matmuls():
        K.sgemm_many((many, many), (A, A), (B, B2), trans_b=True, accumulate=(False, True))
    one = np.empty_like(many)
    gemm_bf16(one, A, B, trans_b=True)
    gemm_bf16(one, A, B2, trans_b=True, accumulate=True)
    np.testing.assert_array_equal(many, one)


def test_bf16_matmuls_read_the_copy_and_replay(rng):
    """A B inside the values is read from the copy, whatever the values hold now; a plan
    recorded in bf16 replays in bf16 outside the context; leaving restores fp32."""
    A, W = _operands(rng, 9, 40, 24, False, False)
    values = W.reshape(-1).copy()
    copy = np.empty(values.size, np.uint16)
    K.to_bf16(copy, 2 * values)  # a copy that is not the values' own: seen in the result
    C = np.empty((9, 24), np.float32)
    with K.Plan() as plan, K.Bf16Matmuls(values, copy):
        K.sgemm(C, A, values.reshape(W.shape))
    _check(C, ref.matmul_bf16(A, 2 * W), 40, "C from the copy")
    recorded = C.copy()
    C[...] = 0
    plan.run()
    np.testing.assert_array_equal(C, recorded)
    K.sgemm(C, A, W)
    _check(C, ref.matmul(A, W), 40, "C after the context")


def test_bf16_bad_input(rng):
    """One-line errors: a forced path the CPU lacks, an unknown path, a copy of the wrong
    dtype or length, values without a copy."""
    for name in set(BF16_PATHS) - set(K.bf16_paths()):
        with pytest.raises(ValidationError, match=f"no {name} path|refused"):
            K.set_bf16(name)
        assert K.kernels_info()["bf16"] == BEST  # unchanged
    with pytest.raises(ValidationError, match="expected one of"):
        K.set_bf16("fp8")
    values = np.zeros(10, np.float32)
    with pytest.raises(ValidationError, match="Bf16Matmuls: copy has dtype float32"):
        K.Bf16Matmuls(values, values)
    with pytest.raises(Exception, match=r"Bf16Matmuls: copy"):
        K.Bf16Matmuls(values, np.zeros(9, np.uint16))
    with pytest.raises(ValidationError, match="both or neither"):
        K.Bf16Matmuls(values)
    with pytest.raises(ValidationError, match="to_bf16: out has dtype float32"):
        K.to_bf16(values, values)
    info = K.kernels_info()
    assert info["bf16"] in info["bf16_supported"] and "portable" in info["bf16_supported"]


# ---- the training step ----------------------------------------------------------------------

def _loss_and_grad(options, precision_, seed, data):
    model = LLM(ModelConfig(**SIZES, **options), vocab(), seed=seed)
    step = TrainStep(model, Adam(model.params), 1.0, precision=precision_)
    loss, _ = step.loss_and_backward(*data)
    return loss, model.params.grad.copy()


@pytest.mark.parametrize("options", ref.ARCHS.values(), ids=ref.ARCHS.keys())
def test_bf16_step_close_to_fp32(told, options):
    """The loss of a bf16 step within 2e-3 (relative) of fp32's, its gradient within 3% (in
    L2, relative) where the feed-forward is GELU, within 15% with ReLU: a ReLU whose input
    rounds across 0 passes all of its gradient or none, and in these small layers each of
    the few such flips moves the norm by percents (the flips' share, not the bf16 error)."""
    smooth = options.get("arch") == "gpt" or options.get("activation") == "gelu"
    for seed in (1, 2):
        data = batches(np.random.default_rng(seed), 1, shapes=((3, 12),))[0]
        l32, g32 = _loss_and_grad(options, "fp32", seed, data)
        l16, g16 = _loss_and_grad(options, "bf16", seed, data)
        assert abs(l16 - l32) <= 2e-3 * l32
        error = np.linalg.norm(g16 - g32) / np.linalg.norm(g32)
        assert error <= (0.03 if smooth else 0.15), f"gradient off by {error:.3f}"


def test_bf16_training_is_reproducible_and_tracks_fp32(told, rng):
    """bf16 steps replayed from plans = layer by layer, and deferred updates = immediate
    ones, bit for bit (the copy is refreshed inside the plan, after the update); over 30
    steps on three batches the loss falls as fp32's: the first 6 within 1% of fp32's, the
    mean of the last 9 within 10% (two runs of a small model at lr 1e-2 part ways as any
    perturbation makes them); the master weights and moments stay float32."""
    data = batches(rng, 3) * 10

    def train(precision_, replay=True, defer=True):
        model = LLM(ModelConfig(**SIZES, arch="gpt"), vocab(), seed=4)
        step = TrainStep(model, Adam(model.params), 1.0, replay=replay, precision=precision_)
        curve = [step.run([b], 1e-2, defer=defer)[0] for b in data]
        model.settle()
        return curve, model.params.data.copy(), step

    curve, weights, step = train("bf16")
    assert step.precision == "bf16" and step.plans_recorded == 3
    for variant in (train("bf16", replay=False), train("bf16", defer=False)):
        assert variant[0] == curve
        np.testing.assert_array_equal(variant[1], weights)
    fp32 = train("fp32")[0]
    np.testing.assert_allclose(curve[:6], fp32[:6], rtol=0.01)
    late, late32 = np.mean(curve[-9:]), np.mean(fp32[-9:])
    assert abs(late - late32) <= 0.1 * late32 and late < curve[0] - 0.5  # it learns
    assert weights.dtype == np.float32 and step.optimizer.m.dtype == np.float32


def test_precision_auto_and_settings(told, caplog, monkeypatch):
    """auto: fp32 with a log line where the CPU has no fast bf16 path (this machine, unless
    it has one), bf16 where it has; bf16 on the portable path warns; the config keys are
    checked."""
    fast = K.kernels_info()["bf16"] in precision.FAST_BF16
    with caplog.at_level(logging.INFO, "rustgpt"):
        assert precision.resolve("auto", "[training] precision") == ("bf16" if fast else "fp32")
        assert precision.resolve("bf16", "[training] precision") == "bf16"
    messages = " | ".join(r.getMessage() for r in caplog.records)
    assert "[training] precision = auto: " + ("bf16" if fast else "fp32") in messages
    assert fast or "bf16 on the portable path" in messages
    info = {**K.kernels_info(), "bf16": "amx"}
    monkeypatch.setattr(K, "kernels_info", lambda: info)
    assert precision.resolve("auto", "x") == "bf16"
    with pytest.raises(ValidationError, match="x = 'fp16', expected one of fp32, bf16, auto"):
        precision.resolve("fp16", "x")
    assert TrainingConfig().precision == GenerationConfig().precision == "fp32"
    with pytest.raises(ConfigError, match=r"\[training\] precision = 'fp16', expected fp32"):
        TrainingConfig(precision="fp16")


# ---- generation -------------------------------------------------------------------------------

def test_bf16_generation_close_to_fp32(told, rng):
    """Decoding in bf16 (weights read from a bf16 copy) along fp32's greedy path: every
    step's logits within 2% of their range of fp32's, prefill and cached steps alike; the
    bf16 cache agrees with a bf16 forward over the window; generate() runs in bf16."""
    model = LLM(ModelConfig(**SIZES, arch="gpt"), vocab(), seed=5)
    step = TrainStep(model, Adam(model.params), 1.0)
    for b in batches(rng, 20):
        step.run([b], 1e-2)
    ids = [3, 7, 1, 4]
    weights = precision.decoding_weights(model, "bf16", "test")
    c32, c16 = model.new_cache(1), model.new_cache(1)
    for _ in range(8):
        l32 = generation._next_logits(model, c32, [ids])[0].copy()
        l16 = generation._next_logits(model, c16, [ids], weights)[0].copy()
        full = generation._next_logits(model, None, [ids], weights)[0]
        spread = l32.max() - l32.min()
        assert np.abs(l16 - l32).max() <= 0.02 * spread
        assert np.abs(full - l16).max() <= 1e-4 * spread
        ids.append(int(np.argmax(l32)))
    text = generation.generate(model, "w1 w2", max_tokens=6, raw=True, precision="bf16")
    assert isinstance(text, str)
    assert precision.decoding_weights(model, "fp32", "test") is None
