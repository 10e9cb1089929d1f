"""Checkpoints: round trip, exact resume from a file, manager pruning and best tracking,
and every kind of damaged or foreign file refused with a SerializationError."""

import json
import math
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from rustgpt import generation
from rustgpt.checkpoint import BEST_NAME, FORMAT_VERSION, Checkpoint, CheckpointManager, load
from rustgpt.config import Config, ModelConfig, TrainingConfig
from rustgpt.data import Dataset
from rustgpt.errors import SerializationError, ValidationError
from rustgpt.model import LLM
from rustgpt.tokenizer import Vocab, train_tokenizer
from rustgpt.training import Callback, Trainer, rustgpt_phases

TEXTS = ["the sun rises in the east </s>", "rain falls from clouds </s>",
         "User: where does the sun rise ? Assistant: in the east </s>",
         "User: what falls from clouds ? Assistant: rain </s>"]
CONFIG = Config(model=ModelConfig(embedding_dim=16, hidden_dim=24, num_layers=2, num_heads=2,
                                  max_seq_len=16),
                training=TrainingConfig(pretraining_epochs=3, instruction_epochs=3, shuffle=True,
                                        schedule="cosine", warmup_steps=2, seed=5))


class Losses(Callback):
    def __init__(self, stop_at=None):
        self.losses, self.stop_at = [], stop_at

    def on_step(self, trainer, record):
        self.losses.append(record["loss"])
        if record["step"] == self.stop_at:
            trainer.request_stop()


def make_trainer(callback, seed=None, vocab=None):
    vocab = vocab or Vocab.from_texts(TEXTS)
    model = LLM(CONFIG.model, vocab, seed=CONFIG.training.seed if seed is None else seed)
    phases = rustgpt_phases(CONFIG.training, vocab, 16, Dataset(TEXTS[:2]), Dataset(TEXTS[2:]))
    return Trainer(model, CONFIG.training, phases, [callback])


def test_round_trip(tmp_path):
    trainer = make_trainer(Losses(stop_at=3))
    trainer.run()
    path = Checkpoint.from_trainer(trainer, CONFIG).save(tmp_path / "a.safetensors")
    ckpt = Checkpoint.load(path)
    assert ckpt.config == CONFIG and ckpt.tokenizer == trainer.model.tokenizer and ckpt.step == 3
    for name, value in trainer.model.named_parameters():
        np.testing.assert_array_equal(ckpt.weights[name], value)
    np.testing.assert_array_equal(ckpt.optimizer["m"], trainer.optimizer.m)
    assert ckpt.optimizer["t"] == 3 and math.isfinite(ckpt.loss)
    ids = trainer.model.tokenizer.encode("the sun rises")
    np.testing.assert_array_equal(load(path).forward([ids]), trainer.model.forward([ids]))
    # plain safetensors: weights by attribute path, optimizer moments beside them
    tensors = load_file(path)
    assert tensors["blocks.0.attn.wq"].shape == (16, 16) and "optim.v.output.b" in tensors


def test_resume_from_file_continues_exactly(tmp_path):
    full = Losses()
    make_trainer(full).run()
    first = Losses(stop_at=4)
    trainer = make_trainer(first)
    trainer.run()
    path = Checkpoint.from_trainer(trainer, CONFIG).save(tmp_path / "mid.safetensors")
    second = Losses()
    resumed = make_trainer(second, seed=999)
    Checkpoint.load(path).restore(resumed)
    resumed.run()
    assert first.losses + second.losses == full.losses


def test_manager_prunes_and_tracks_best_of_the_latest_phase(tmp_path):
    manager = CheckpointManager(tmp_path / "run", max_to_keep=2)
    assert manager.latest() is None and manager.best() is None
    model = LLM(CONFIG.model, Vocab.from_texts(TEXTS))

    def save(step, phase, loss):
        c = Checkpoint.from_model(model, CONFIG, loss=loss)
        c.trainer = {"position": {"step": step, "phase": phase, "epoch": 0, "batch": 0,
                                  "order": None}}
        return manager.save(c)

    save(1, 0, 3.0)
    save(2, 0, 2.0)  # best so far
    save(3, 0, 2.5)
    assert [p.name for p in manager.checkpoints()] == ["ckpt-00000002.safetensors",
                                                       "ckpt-00000003.safetensors"]
    assert Checkpoint.load(manager.best()).loss == 2.0
    save(4, 1, 4.0)  # a later phase wins despite a higher loss (other data)
    assert Checkpoint.load(manager.best()).step == 4
    assert manager.latest().name == "ckpt-00000004.safetensors"
    assert CheckpointManager.resolve(tmp_path / "run") == tmp_path / "run" / BEST_NAME
    with pytest.raises(SerializationError, match="no checkpoint in this directory"):
        CheckpointManager.resolve(tmp_path)


def test_model_only_checkpoints_are_named_by_their_step(tmp_path):
    manager = CheckpointManager(tmp_path, max_to_keep=2)
    model = LLM(CONFIG.model, Vocab.from_texts(TEXTS))
    for epoch in (10, 20, 30):
        manager.save(Checkpoint.from_model(model, CONFIG, loss=1.0 / epoch, step=epoch))
    assert [p.name for p in manager.checkpoints()] == ["ckpt-00000020.safetensors",
                                                       "ckpt-00000030.safetensors"]
    back = Checkpoint.load(manager.latest())
    assert back.step == 30 and back.trainer is None and back.info()["step"] == 30
    assert Checkpoint.load(manager.best()).loss == pytest.approx(1 / 30)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValidationError, match="step = .*expected an integer >= 0"):
            Checkpoint.from_model(model, CONFIG, step=bad)


def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    model = LLM(CONFIG.model, Vocab.from_texts(TEXTS))
    path = Checkpoint.from_model(model, CONFIG, loss=1.0).save(tmp_path / "c.safetensors")
    before = path.read_bytes()

    def boom(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("os.fsync", boom)
    with pytest.raises(SerializationError, match="No space left on device"):
        Checkpoint.from_model(model, CONFIG, loss=0.5).save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]  # no temporary left


@pytest.fixture
def good(tmp_path):
    model = LLM(CONFIG.model, Vocab.from_texts(TEXTS))
    return Checkpoint.from_model(model, CONFIG, loss=1.0).save(tmp_path / "good.safetensors")


def rewrite(path, tmp_path, change):
    """Copy of checkpoint `path` with its tensors / metadata edited by change(tensors, meta)."""
    raw = path.read_bytes()
    meta = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])["__metadata__"]
    tensors = load_file(path)
    change(tensors, meta)
    out = tmp_path / "edited.safetensors"
    save_file(tensors, out, metadata=meta)
    return out


@pytest.mark.parametrize("damage,message", [
    (lambda raw: raw[:len(raw) // 2], "not a readable safetensors file"),
    (lambda raw: bytes(np.random.default_rng(0).integers(0, 256, 4096, np.uint8)),
     "not a readable safetensors file"),
    (lambda raw: b"", "not a readable safetensors file"),
])
def test_truncated_or_random_files(good, tmp_path, damage, message):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(damage(good.read_bytes()))
    with pytest.raises(SerializationError, match=message):
        Checkpoint.load(bad)


def test_foreign_and_mismatched_files(good, tmp_path):
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": np.zeros((2, 2), np.float32)}, foreign)
    with pytest.raises(SerializationError, match="not a rustgpt checkpoint"):
        Checkpoint.load(foreign)

    def version(t, m):
        m["format_version"] = "99"
    with pytest.raises(SerializationError, match="format version 99, this rustgpt"):
        Checkpoint.load(rewrite(good, tmp_path, version))

    def shape(t, m):
        t["blocks.0.attn.wq"] = np.zeros((16, 8), np.float32)
    with pytest.raises(SerializationError, match=r"blocks.0.attn.wq has shape \(16, 8\), the "
                                                 r"stored config"):
        Checkpoint.load(rewrite(good, tmp_path, shape))

    def vocab(t, m):
        words = json.loads(m["tokenizer"])["words"] + ["extra"]
        m["tokenizer"] = json.dumps({"kind": "word", "words": words})
    with pytest.raises(SerializationError, match="embeddings.token has shape"):
        Checkpoint.load(rewrite(good, tmp_path, vocab))

    def foreign_tokenizer(t, m):
        m["tokenizer"] = json.dumps({"kind": "sentencepiece"})
    with pytest.raises(SerializationError, match="stored config or tokenizer is invalid"):
        Checkpoint.load(rewrite(good, tmp_path, foreign_tokenizer))

    def missing(t, m):
        del t["output.b"]
    with pytest.raises(SerializationError, match=r"missing \['output.b'\]"):
        Checkpoint.load(rewrite(good, tmp_path, missing))

    def config(t, m):
        m["config"] = json.dumps({"model": {"num_heads": 3}})
    with pytest.raises(SerializationError, match="stored config or tokenizer is invalid"):
        Checkpoint.load(rewrite(good, tmp_path, config))

    def dtype(t, m):
        t["output.b"] = t["output.b"].astype(np.float64)
    with pytest.raises(SerializationError, match="dtype float64, expected float32"):
        Checkpoint.load(rewrite(good, tmp_path, dtype))

    with pytest.raises(SerializationError, match="nope.safetensors: no such file"):
        Checkpoint.load(tmp_path / "nope.safetensors")
    with pytest.raises(SerializationError, match="not a regular file"):
        Checkpoint.load(tmp_path)


def test_resume_needs_training_state(good):
    with pytest.raises(SerializationError, match="no training state"):
        Checkpoint.load(good).restore(make_trainer(Losses()))


def test_loads_in_pytorch(good):
    torch_safetensors = pytest.importorskip("safetensors.torch")
    pytest.importorskip("torch")
    tensors = torch_safetensors.load_file(str(good))
    assert tuple(tensors["embeddings.token"].shape) == load_file(good)["embeddings.token"].shape


SAVER = """
import sys
import numpy as np
from rustgpt.checkpoint import Checkpoint
from rustgpt.config import Config
from rustgpt.model import LLM
from rustgpt.tokenizer import Vocab
model = LLM(Config().model, Vocab([f"w{i}" for i in range(2000)] + ["</s>", "<unk>"]))
ckpt = Checkpoint.from_model(model, Config(), loss=0.0)
for i in range(10**6):
    ckpt.loss = float(i)
    ckpt.save(sys.argv[1])
    print(i, flush=True)
"""


def test_kill_9_during_saves_never_damages_the_checkpoint(tmp_path):
    path = tmp_path / "c.safetensors"
    rng = np.random.default_rng(0)
    for attempt in range(8):
        proc = subprocess.Popen([sys.executable, "-c", SAVER, str(path)],
                                stdout=subprocess.PIPE, text=True)
        proc.stdout.readline()  # one complete save exists
        time.sleep(rng.uniform(0.0, 0.05))  # then die somewhere inside a later save
        proc.kill()
        proc.wait()
        ckpt = Checkpoint.load(path)  # intact: the previous or the new version, never a mix
        assert ckpt.loss >= 0 and ckpt.weights["output.w"].shape == (128, 2002)
    CheckpointManager(tmp_path).remove_stale()  # the temporaries killed writers left
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]


def test_prepare_refuses_a_full_or_unwritable_directory(tmp_path, monkeypatch):
    manager = CheckpointManager(tmp_path / "run", max_to_keep=2)
    manager.prepare(checkpoint_bytes=1000)  # fits
    full = shutil._ntuple_diskusage(10**9, 10**9 - 5 * 2**20, 5 * 2**20)  # 5 MB free
    monkeypatch.setattr("shutil.disk_usage", lambda path: full)
    with pytest.raises(SerializationError, match=r"5 MB free, the checkpoints need about 24 MB"):
        manager.prepare(checkpoint_bytes=6 * 2**20)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SerializationError, match="cannot write checkpoints here"):
        CheckpointManager(blocker / "run").prepare()


# ---- values that are not what a checkpoint holds ----------------------------------------------

def test_non_finite_weights_are_refused_unless_allowed(good, tmp_path):
    """NaN weights loaded silently and generated '!!!!'; the flag is for inspecting them."""
    def nan(t, m):
        t["blocks.1.ffn.w1"][2, 3] = np.nan
        t["blocks.1.ffn.w1"][0, 0] = -np.inf
    bad = rewrite(good, tmp_path, nan)
    message = (r"edited.safetensors: tensor blocks.1.ffn.w1 holds 2 NaN or infinite values of "
               r"384, expected finite numbers \(allow_non_finite=True loads it anyway\)$")
    with pytest.raises(SerializationError, match=message):
        Checkpoint.load(bad)
    with pytest.raises(SerializationError, match=message):
        load(bad)
    assert np.isnan(Checkpoint.load(bad, allow_non_finite=True).weights["blocks.1.ffn.w1"][2, 3])
    assert np.isnan(load(bad, allow_non_finite=True).params.values["blocks.1.ffn.w1"][2, 3])


def test_non_finite_optimizer_moments_are_refused(tmp_path):
    trainer = make_trainer(Losses(stop_at=2))
    trainer.run()
    good = Checkpoint.from_trainer(trainer, CONFIG).save(tmp_path / "t.safetensors")

    def inf(t, m):
        t["optim.v.output.b"][1] = np.inf
    with pytest.raises(SerializationError, match="tensor optim.v.output.b holds 1 NaN"):
        Checkpoint.load(rewrite(good, tmp_path, inf))


@pytest.fixture
def trained(tmp_path):
    trainer = make_trainer(Losses(stop_at=3))
    trainer.run()
    return Checkpoint.from_trainer(trainer, CONFIG).save(tmp_path / "trained.safetensors")


def _state(path):
    raw = path.read_bytes()
    meta = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])["__metadata__"]
    return json.loads(meta["state"])


def _with_trainer(path, **changes):
    state = _state(path)
    return {**state, "trainer": {**state["trainer"], **changes}}


def _with_position(path, **changes):
    state = _state(path)
    return _with_trainer(path, position={**state["trainer"]["position"], **changes})


@pytest.mark.parametrize("state,message", [
    ("[]", "metadata state is an array, expected an object"),
    ('"[]"', 'metadata state is "[]", expected an object'),
    ("[" * 100_000 + "]" * 100_000, "damaged metadata (RecursionError"),
    ('{"trainer": 5}', "metadata state.trainer is 5, expected an object or null"),
    ('{"trainer": null, "loss": "x"}', 'metadata state.loss is "x", expected a number or null'),
    ('{"trainer": null, "optimizer_t": 1.5}', "state.optimizer_t is 1.5, expected an integer"),
    ('{"trainer": null, "optimizer_t": 3e10}', "state.optimizer_t is 30000000000.0"),
    ('{"trainer": null, "optimizer_t": true}', "state.optimizer_t is true, expected an integer"),
    ('{"trainer": null, "timestamp": []}', "state.timestamp is an array, expected a number"),
    ('{"loss": 1.0}', "metadata state has no 'trainer'"),
    ('{"trainer": {"position": []}}', "state.trainer.position is an array, expected an object"),
    ('{"trainer": {"position": {"phase": 0}}}', "state.trainer.position has no 'epoch'"),
    (lambda p: _with_position(p, step="3"), 'state.trainer.position.step is "3", expected an '
                                           'integer >= 0'),
    (lambda p: _with_position(p, epoch=-1), "state.trainer.position.epoch is -1"),
    (lambda p: _with_position(p, order=[0, "1"]), "state.trainer.position.order is an array, "
                                                  "expected an array of integers >= 0 or null"),
    (lambda p: _with_position(p, extra=1), "state.trainer.position has unknown fields "
                                           "['extra']"),
    (lambda p: _with_trainer(p, rng=5), "state.trainer.rng is 5, expected an object"),
    (lambda p: _with_trainer(p, rng={"bit_generator": "MT19937"}), "state.trainer.rng is not a "
                                                                   "numpy PCG64 state"),
    (lambda p: _with_trainer(p, rng={}), "state.trainer.rng is not a numpy PCG64 state"),
    (lambda p: _with_trainer(p, last_loss=None), "state.trainer.last_loss is null, expected a "
                                                 "number"),
    (lambda p: _with_trainer(p, epoch_losses=[1.0, "x"]), "state.trainer.epoch_losses is an "
                                                          "array, expected an array of numbers"),
])
def test_malformed_state_metadata(trained, tmp_path, state, message):
    """Each was a RecursionError, AttributeError or TypeError in load or restore."""
    text = state if isinstance(state, str) else json.dumps(state(trained))

    def change(t, m):
        m["state"] = text
    with pytest.raises(SerializationError, match=re.escape(message)):
        Checkpoint.load(rewrite(trained, tmp_path, change)).restore(make_trainer(Losses()))


def test_positions_outside_the_trainers_data_are_refused(trained, tmp_path):
    for changes, message in (({"phase": 3}, "checkpoint position: phase 3, the trainer has 2 "
                                            "phases"),
                             ({"order": [0, 5]}, "checkpoint position: the epoch's order holds "
                                                 "example 5, the phase has 2 examples")):
        text = json.dumps(_with_position(trained, **changes))

        def change(t, m):
            m["state"] = text
        ckpt = Checkpoint.load(rewrite(trained, tmp_path, change))
        with pytest.raises(SerializationError, match=re.escape(message)):
            ckpt.restore(make_trainer(Losses()))
    ckpt = Checkpoint.load(trained)
    ckpt.trainer = {"position": ckpt.trainer["position"]}  # a model's checkpoint with a step
    with pytest.raises(SerializationError, match=r"training state lacks \['rng', 'last_loss', "
                                                 r"'epoch_loss'\]"):
        ckpt.restore(make_trainer(Losses()))


def test_a_config_of_absurd_size_is_refused_before_its_table_is_built(good, tmp_path):
    def layers(t, m):
        config = json.loads(m["config"])
        config["model"]["num_layers"] = 10**9
        m["config"] = json.dumps(config)
    start = time.perf_counter()
    with pytest.raises(SerializationError, match="num_layers = 1000000000, the file holds 26 "
                                                 "weight tensors"):
        Checkpoint.load(rewrite(good, tmp_path, layers))
    assert time.perf_counter() - start < 1.0


FIXTURES = Path(__file__).parent / "fixtures"


def test_format_1_checkpoints_still_load_and_resume():
    """ckpt-v1.safetensors: written by rustgpt 0.1.0 before the format held a tokenizer of
    any kind (a word list under "vocab"); ckpt-v1.json: that version's logits for a text."""
    expected = json.loads((FIXTURES / "ckpt-v1.json").read_text())
    old = Checkpoint.load(FIXTURES / "ckpt-v1.safetensors")
    assert old.format_version == 1 and old.tokenizer.kind == "word"
    assert old.step == expected["step"] and old.optimizer is not None
    model = old.build_model()
    assert model.tokenizer.encode(expected["text"]) == expected["ids"]
    logits = model.forward(np.array([expected["ids"]], np.intc))[0]
    np.testing.assert_allclose(logits, expected["logits"], atol=1e-5)
    # its training state (optimizer, position, RNG) goes into a trainer of its config
    texts = ["the sun rises in the east </s>",
             "User: where does the sun rise ? Assistant: in the east </s>"]
    trainer = Trainer(model, old.config.training, rustgpt_phases(
        old.config.training, old.tokenizer, 16, Dataset(texts[:1]), Dataset(texts[1:])))
    old.restore(trainer)
    assert trainer.optimizer.t == old.optimizer["t"] and trainer.position.step == old.step


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_a_checkpoint_carries_any_tokenizer(tmp_path, kind):
    texts = ["the sun rises in the east\n", "héllo wörld ✓\n"] * 20
    tokenizer = train_tokenizer(kind, texts, vocab_size=300) if kind == "bpe" else \
        train_tokenizer(kind, texts)
    model = LLM(CONFIG.model, tokenizer, seed=1)
    path = Checkpoint.from_model(model, CONFIG, step=3).save(tmp_path / "c.safetensors")
    back = Checkpoint.load(path)
    assert back.format_version == FORMAT_VERSION and back.tokenizer.kind == kind
    assert back.tokenizer.to_dict() == tokenizer.to_dict()
    again = back.build_model()
    ids = tokenizer.encode("the sun héllo")
    np.testing.assert_array_equal(again.forward(np.array([ids], np.intc)),
                                  model.forward(np.array([ids], np.intc)))
    # no end-of-text id (char): generation runs to max_tokens
    text = generation.generate(again, "the sun", raw=True, max_tokens=6)
    assert isinstance(text, str) and (kind == "bpe" or len(text) == 6)
