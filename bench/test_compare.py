"""compare.py's arithmetic: the FLOP count its GFLOP/s figures divide, and the floor its
missed targets are set against; the bf16 verdicts; the own-text workload's corpus
(bench/corpus.py) and, on a tiny recipe, its rows."""

import importlib.metadata
import re

import numpy as np
import pytest

from bench import compare, corpus
from bench.compare import _bf16_verdict, kernel_floor, synthetic_vocab, training_flops
from rustgpt import _kernels as K
from rustgpt.config import ModelConfig
from rustgpt.model import LLM
from rustgpt.optim import Adam
from rustgpt.step import TrainStep

SIZES = dict(embedding_dim=24, hidden_dim=40, num_layers=2, num_heads=2, max_seq_len=16)
SMALL = ModelConfig(**SIZES)


@pytest.mark.parametrize("arch", ["rustgpt", "gpt"])
def test_training_flops_counts_the_models_matmuls_and_attention(arch, monkeypatch, rng):
    """A step of the model (layer by layer) multiplies exactly what training_flops
    counts: its sgemm calls' 2 M N K, and causal attention's six T (T + 1) / 2 products
    per layer and sequence; with gpt's block, the attention projection and the tied output
    layer too."""
    config, vocab = ModelConfig(**SIZES, arch=arch), synthetic_vocab()
    model = LLM(config, vocab, seed=0)
    counted = {"matmul": 0.0, "attention": 0.0}

    def product(C, A, trans_a):
        A = A.reshape(-1, A.shape[-1])
        return 2.0 * C.size * (A.shape[0] if trans_a else A.shape[1])

    def sgemm(C, A, B, trans_a=False, trans_b=False, *args, real=K.sgemm, **kwargs):
        counted["matmul"] += product(C, A, trans_a)
        return real(C, A, B, trans_a, trans_b, *args, **kwargs)

    def sgemm_many(Cs, As, Bs, trans_a=False, trans_b=False, accumulate=False,
                   real=K.sgemm_many):
        counted["matmul"] += sum(product(C, A, trans_a) for C, A in zip(Cs, As))
        return real(Cs, As, Bs, trans_a, trans_b, accumulate)

    def attention(products, real):
        def call(*args):
            # forward (out, att, q, ...), backward (dq, dk, dv, dout, att, q, ...)
            q = args[2] if products == 2 else args[5]
            B, T, D = q.shape
            counted["attention"] += products * 2.0 * B * T * (T + 1) / 2 * D
            return real(*args)
        return call

    monkeypatch.setattr(K, "sgemm", sgemm)
    monkeypatch.setattr(K, "sgemm_many", sgemm_many)
    monkeypatch.setattr(K, "attention_forward", attention(2, K.attention_forward))
    monkeypatch.setattr(K, "attention_backward", attention(4, K.attention_backward))
    ids = rng.integers(0, vocab.size, (3, 13)).astype(np.intc)
    model.loss_and_backward(ids, ids)
    assert counted["attention"] > 0
    assert sum(counted.values()) == training_flops(config, vocab.size, [(ids, ids, 1e-3)])


def test_kernel_floor_times_every_call_of_a_step(rng):
    """kernel_floor times each call a recorded step makes (the plan's, and the two checks of
    the ids that run outside it), for every step even where a shape repeats (a model would
    replay its plan without the Python), and puts every kernel back."""
    config, vocab = SMALL, synthetic_vocab()
    ids = rng.integers(0, vocab.size, (3, 13)).astype(np.intc)
    kernels = dict(vars(K))
    floor = kernel_floor(config, vocab, [(ids, ids, 1e-3), (ids[::-1].copy(), ids, 1e-3)],
                         rounds=2)
    assert dict(vars(K)) == kernels
    model = LLM(config, vocab, seed=0)
    step = TrainStep(model, Adam(model.params))
    step.loss_and_backward(ids, ids)
    (plan, *_), = step._plans.values()
    assert floor["calls"] == 2 * (len(plan) + 2)  # and scan_ids on inputs and targets
    assert all(floor[kind] > 0 for kind in ("matmul", "attention", "other"))


def test_plain_gives_iambics_markdown_the_form_of_tinyshakespeare():
    markdown = ("# Hamlet\n\n## ACT I\n\n### SCENE I. Elsinore.\n\n_FRANCISCO at his post_\n\n"
                "**BERNARDO**  \nWho's there?\n\n**MARCELLUS & HORATIO**  \n_\\[Aside]_  \n"
                "\\--Is't possible?\n\n")
    assert corpus.plain(markdown) == (
        "Hamlet\n\nACT I\n\nSCENE I. Elsinore.\n\nFRANCISCO at his post\n\nBERNARDO:\n"
        "Who's there?\n\nMARCELLUS & HORATIO:\n[Aside]\n--Is't possible?\n")


def test_corpus_path_writes_whole_plays_up_to_the_target_once(tmp_path):
    try:
        version = importlib.metadata.version(corpus.PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        version = None
    if version != corpus.VERSION:
        pytest.skip(f"needs {corpus.PACKAGE} {corpus.VERSION}")
    path = corpus.corpus_path(tmp_path)
    text = path.read_text(encoding="utf-8")
    assert text.startswith("A Midsummer Night's Dream\n\nACT I\n")
    assert corpus.TARGET_BYTES <= len(text.encode()) < corpus.TARGET_BYTES + 200_000
    assert "**" not in text and "\\" not in text
    stamp = path.stat().st_mtime_ns
    assert corpus.corpus_path(tmp_path) == path and path.stat().st_mtime_ns == stamp


def test_bf16_verdict_names_targets_only_for_rows_that_have_them(monkeypatch):
    """The ratios always; on a path without targets, a note only for a row that has them on
    other paths (c), none for the others (b, own-text); on AMX, c's verdicts."""
    rate = {"rustgpt": 2.0, "rustgpt bf16": 1.0, "torch bf16": 0.5}
    ratios = "0.50x rustgpt fp32, 2.00x PyTorch autocast"
    monkeypatch.setattr(K, "kernels_info", lambda: {"bf16": "portable"})
    assert _bf16_verdict("c", rate) == \
        f"bf16 (portable path): {ratios} (targets are set for AMX and AVX512-BF16)"
    for key in ("b", "own-text"):
        assert _bf16_verdict(key, rate) == f"bf16 (portable path): {ratios}"
    monkeypatch.setattr(K, "kernels_info", lambda: {"bf16": "amx"})
    assert _bf16_verdict("c", rate) == (
        f"bf16 (amx path): {ratios} — >= 2.5x rustgpt fp32: 0.50x, MISSED; "
        f">= 1.2x PyTorch autocast: 2.00x, met")


@pytest.mark.parametrize("fast_bf16", [True, False], ids=["bf16-units", "no-bf16-units"])
def test_own_text_fills_the_fp32_and_bf16_columns(tmp_path, monkeypatch, fast_bf16):
    """The own-text workload on a tiny recipe and text: four processes in turn (rustgpt,
    the port, each in fp32 then with --precision bf16), every column of its three rows
    filled; the wall-time row's target the fp32 verdict and the bf16 ratios, the val-loss
    row's both margins, each met or missed as its gap says. On a CPU without AMX or
    AVX512-BF16 the port's autocast run is skipped, its cells saying why."""
    pytest.importorskip("torch")
    monkeypatch.setattr(compare, "FAST_BF16", (K.kernels_info()["bf16"],) if fast_bf16 else ())
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n\n" * 40
    (tmp_path / "play.txt").write_text(text, encoding="utf-8")
    monkeypatch.setattr(corpus, "corpus_path", lambda: tmp_path / "play.txt")
    monkeypatch.setattr(compare, "OWN_TEXT", {
        "num-layers": 1, "num-heads": 2, "embedding-dim": 16, "hidden-dim": 32,
        "max-seq-len": 8, "batch-size": 4, "max-iters": 6, "pretraining-lr": 1e-2,
        "warmup-steps": 2, "weight-decay": 0.1, "beta2": 0.99, "max-grad-norm": 1.0,
        "eval-interval": 3, "eval-iters": 2})
    monkeypatch.setattr(compare, "fma_peak", lambda threads: 100.0)
    started = []
    for name in ("of_rustgpt", "of_torch_port"):
        def noted(cls, text, options, *rest, name=name, run=getattr(compare.OwnTextRun, name)):
            started.append((name, [o for o in options if o.startswith("--precision")]))
            return run(text, options, *rest)
        monkeypatch.setattr(compare.OwnTextRun, name, classmethod(noted))
    report = compare.Report(quick=True, threads=1)
    report.settle = lambda: True
    report.workload_own_text()
    bf16 = ["--precision=bf16"]
    assert started == [("of_rustgpt", []), ("of_torch_port", []), ("of_rustgpt", bf16),
                       ("of_torch_port", bf16)][:4 if fast_bf16 else 3]
    sides = ("rustgpt", "torch", "rustgpt bf16", "torch bf16")[:4 if fast_bf16 else 3]
    wall, loss, gflops = report.rows
    if not fast_bf16:
        for row in report.rows:
            assert row.cells["torch bf16"].startswith("skipped: no AMX or AVX512-BF16")
    for row in report.rows:
        for side in sides:
            assert re.fullmatch(r"[\d,.]+ .+", row.cells[side]), (row.workload, side)
    rate = {side: float(re.search(r"\(([\d,.]+) tok/s\)", wall.cells[side])[1].replace(",", ""))
            for side in sides}
    ratios = re.fullmatch(rf">= 1.5x PyTorch: (\S+)x, (met|MISSED); bf16 "
                          rf"\({K.kernels_info()['bf16']} path\): (\S+)x rustgpt fp32"
                          rf"(?:, (\S+)x PyTorch autocast)?", wall.target)
    assert ratios and (ratios[4] is not None) == fast_bf16, wall.target
    for got, (side, base) in zip(ratios.group(1, 3, 4)[:len(sides) - 1],
                                 [("rustgpt", "torch"), ("rustgpt bf16", "rustgpt"),
                                  ("rustgpt bf16", "torch bf16")]):
        assert float(got) == pytest.approx(rate[side] / rate[base], rel=0.02), (side, base)
    val = {side: float(loss.cells[side].split()[0]) for side in sides}
    checks = re.fullmatch(r"<= PyTorch \+ 0.02: (\S+), (met|MISSED); "
                          r"bf16 <= rustgpt fp32 \+ 0.02: (\S+), (met|MISSED)", loss.target)
    assert checks, loss.target
    for (side, base), gap, verdict in ((("rustgpt", "torch"), checks[1], checks[2]),
                                       (("rustgpt bf16", "rustgpt"), checks[3], checks[4])):
        assert float(gap) == pytest.approx(val[side] - val[base], abs=1.1e-4)
        assert verdict == ("met" if float(gap) <= compare.OWN_TEXT_LOSS_MARGIN else "MISSED")
    assert loss.ratio == checks[1]
    assert "of peak" in gflops.cells["rustgpt bf16"]
