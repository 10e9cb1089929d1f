"""LLM: the transformer composed from the layers (RustGPT's block, or GPT-2's as options),
over one flat parameter buffer.

Forward, loss and backward for training; prefill and one-token steps against a KV cache
for generation; the parameter table, the init, named state and description.
"""

from __future__ import annotations

import functools
import math
import threading
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

import numpy as np

from rustgpt import _kernels as K
from rustgpt.errors import (
    ArchitectureError,
    ShapeMismatch,
    TokenError,
    ValidationError,
)
from rustgpt.layers import (
    Embeddings,
    FeedForward,
    FlatParameters,
    LayerNorm,
    Module,
    OutputProjection,
    SelfAttention,
    TransformerBlock,
    Workspace,
    _rows,
    dropout_seed,
)
from rustgpt.resources import allocating, check_memory

if TYPE_CHECKING:
    from rustgpt.config import ModelConfig
    from rustgpt.optim import Adam
    from rustgpt.step import TrainStep
    from rustgpt.tokenizer import Tokenizer

IGNORE_INDEX = -1  # target id of padded positions: no loss, no gradient


def _array(ids, name: str) -> np.ndarray:
    """ids as a numpy array; a ValidationError naming `name` when they are ragged."""
    try:
        return np.asarray(ids)
    except ValueError as e:  # nested sequences of unequal lengths
        raise ValidationError(f"{name} is not a rectangular (B, T) array of token ids: "
                              f"{e}") from None


def _integers(arr: np.ndarray, name: str) -> np.ndarray:
    """arr, after checking it holds integers (token ids)."""
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValidationError(f"{name} has dtype {arr.dtype}, expected integer token ids")
    return arr


def _out_of_vocab(name: str, bad, V: int) -> TokenError:
    return TokenError(f"{name} holds token id {bad}, expected ids in [0, {V})")


def _reads(method):
    """A method of LLM that reads the parameters runs inside ``LLM.reading()``."""
    @functools.wraps(method)
    def read(self, *args, **kwargs):
        with self.reading():
            return method(self, *args, **kwargs)
    return read


def check_seed(seed, where: str) -> None:
    """A seed is an integer >= 0 (numpy's rule), else a ValidationError naming `where`."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValidationError(f"{where}: seed = {seed!r}, expected an integer >= 0")


def _build_layers(root: Module, config: ModelConfig, vocab_size: int,
                  num_layers: int | None = None) -> None:
    """The layer tree under `root`: embeddings, blocks.0 .. blocks.L-1, ln_f (pre-norm
    only), output (L = `num_layers`, else the config's), with the init of config.arch."""
    c, D = config, config.embedding_dim
    # dropout sites (each its own mask): the embeddings 0, block i's sub-layers 2i+1, 2i+2
    embeddings = root.child("embeddings", Embeddings(vocab_size, D, c.max_seq_len,
                                                     c.dropout, site=0))
    for i in range(c.num_layers if num_layers is None else num_layers):
        root.child(f"blocks.{i}", TransformerBlock(
            D, c.hidden_dim, c.num_heads, norm=c.norm, activation=c.activation,
            projection=c.attention_projection, bias=c.bias, dropout=c.dropout,
            site=2 * i + 1))
    if c.norm == "pre":  # GPT-2's final norm before the output projection
        root.child("ln_f", LayerNorm(D, c.bias))
    root.child("output", OutputProjection(D, vocab_size, c.bias,
                                          tied=embeddings if c.tie_embeddings else None))
    if c.arch == "gpt":
        _gpt_init(root, c.num_layers)


def _gpt_init(root: Module, num_layers: int) -> None:
    """nanoGPT's init over the layers' own (DESIGN.md's): every weight N(0, 0.02), and the
    projections that end in the residual stream (attention's wo, the feed-forward's w2)
    N(0, 0.02 / sqrt(2 L)), as GPT-2 scales them; norm gains 1 and biases 0 as declared."""
    for module in root.modules():
        for name, shape, init, _ in module.own_specs():
            if init == "normal":
                residual = ((isinstance(module, SelfAttention) and name == "wo")
                            or (isinstance(module, FeedForward) and name == "w2"))
                module.param(name, shape, "normal",
                             0.02 / math.sqrt(2 * num_layers) if residual else 0.02)


def parameter_specs(config: ModelConfig, vocab_size: int) -> list[tuple[str, tuple, str, float]]:
    """The parameter table (name, shape, init, value) of a model, without allocating it."""
    root = Module()
    _build_layers(root, config, vocab_size)
    return list(root.named_specs())


def parameter_count(config: ModelConfig, vocab_size: int) -> int:
    """P of a model, without building its L blocks: they are alike, so one is counted."""
    root = Module()
    _build_layers(root, config, vocab_size, num_layers=1)
    block = root._children["blocks.0"].parameters()
    return root.parameters() + (config.num_layers - 1) * block


def activation_bytes(config: ModelConfig, vocab_size: int, B: int, T: int) -> int:
    """Bytes of a training step's activations on (B, T) tokens, a little above what its
    workspace holds. Per token, float32: each block's q, k, v, attention output, norm and
    feed-forward outputs, residuals and their gradients (16 D + 2 H), norm statistics (4)
    and attention weights (NH T), with an attention projection its input and gradient
    (2 D), with gelu the feed-forward's pre-activation (H), with dropout the sub-layers'
    outputs and gradients after it (4 D); the weights' gradient scratch (NH T), the
    embeddings' output and the last input gradient (2 D, with dropout 4 D), the final
    norm's output, gradient and statistics (pre-norm: 2 D + 2), the logits (V), loss and
    hit (2). Besides, the attention kernels' scratch (K.attention_scratch_shape)."""
    c, D, H, NH = config, config.embedding_dim, config.hidden_dim, config.num_heads
    drop = c.dropout > 0
    block = (16 * D + 2 * H + 4 + NH * T + 2 * D * c.attention_projection
             + H * (c.activation == "gelu") + 4 * D * drop)
    per_token = (c.num_layers * block + NH * T + 2 * D * (1 + drop)
                 + (2 * D + 2) * (c.norm == "pre") + vocab_size + 2)
    return 4 * (B * T * per_token + math.prod(K.attention_scratch_shape(T, D, NH)))


class KVCache:
    """Per-request decoding state: keys and values of every layer, and scratch.

    k, v: (L, B, T_max, D); row b has ``lengths[b]`` positions filled, (B,) int32: rows
    of different lengths decode together (a server's requests, see LLM.step)."""

    def __init__(self, num_layers: int, batch: int, max_seq_len: int, dim: int) -> None:
        self.k = np.zeros((num_layers, batch, max_seq_len, dim), np.float32)
        self.v = np.zeros_like(self.k)
        self.lengths = np.zeros(batch, np.intc)
        self.workspace = Workspace()

    @property
    def batch(self) -> int:
        """Rows (sequences) the cache holds."""
        return self.k.shape[1]

    @property
    def length(self) -> int:
        """Positions filled in every row, when the rows are of one length (as prefill
        leaves them); a ValidationError otherwise."""
        if self.lengths.min() != self.lengths.max():
            raise ValidationError(f"KVCache: rows of lengths {self.lengths.min()} to "
                                  f"{self.lengths.max()} have no common length")
        return int(self.lengths[0])

    def rows(self, start: int, stop: int) -> KVCache:
        """Rows start..stop-1 as a cache of their own that shares this one's arrays (k, v,
        lengths are views) and workspace: prefill and step one request's row, or the
        first B of a server's batch."""
        view = object.__new__(KVCache)
        view.k, view.v = self.k[:, start:stop], self.v[:, start:stop]
        view.lengths, view.workspace = self.lengths[start:stop], self.workspace
        return view

    def move_row(self, src: int, dst: int) -> None:
        """Copy row src (its keys, values and length) over row dst: a batch closing the gap
        a finished row leaves."""
        n = self.lengths[src]
        self.k[:, dst, :n] = self.k[:, src, :n]
        self.v[:, dst, :n] = self.v[:, src, :n]
        self.lengths[dst] = n

    def reorder(self, rows: np.ndarray) -> None:
        """Keep batch rows `rows` (in that order): beam search's reshuffle."""
        self.k = np.ascontiguousarray(self.k[:, rows])
        self.v = np.ascontiguousarray(self.v[:, rows])
        self.lengths = self.lengths[rows]


class LLM(Module):
    """The model: embeddings, ``num_layers`` blocks, (pre-norm) a final layer norm, output
    projection, as the config's architecture options say.

    Build with ``LLM(config, tokenizer, seed)`` (any kind of rustgpt.tokenizer: the model
    reads its size; generation encodes and decodes with it); parameters are drawn from the init of
    config.arch (rustgpt: DESIGN.md's; gpt: nanoGPT's, see _gpt_init).
    ``params.data`` / ``params.grad`` are the flat (P,) buffers the optimizer updates.
    """

    def __init__(self, config: ModelConfig, tokenizer: Tokenizer, seed: int = 0) -> None:
        """Raises ValidationError for a bad seed and ArchitectureError, before allocating,
        for a model whose parameters, gradients and Adam moments (4 float32 copies) need
        more than the memory available."""
        super().__init__()
        check_seed(seed, "LLM")
        c = config
        V = tokenizer.size
        P = parameter_count(c, V)
        what = (f"[model] embedding_dim = {c.embedding_dim}, hidden_dim = {c.hidden_dim}, "
                f"num_layers = {c.num_layers}, max_seq_len = {c.max_seq_len} with a vocabulary "
                f"of {V}: {P:,} parameters")
        check_memory(4 * 4 * P, f"{what}, their gradients and Adam moments need",
                     ArchitectureError)
        self.config = config
        self.tokenizer = tokenizer
        _build_layers(self, config, V)
        self.embeddings: Embeddings = self._children["embeddings"]
        self.blocks: list[TransformerBlock] = [self._children[f"blocks.{i}"]
                                               for i in range(config.num_layers)]
        self.ln_f: LayerNorm | None = self._children.get("ln_f")
        self.output: OutputProjection = self._children["output"]
        with allocating(what, ArchitectureError):
            self.params = FlatParameters(list(self.named_specs()))
        self.bind(self.params)
        self.params.initialize(np.random.default_rng(seed))
        self.seed = seed  # with a step's number, the seed of its dropout masks
        # held while the parameters change (a training step) and while they are read, so
        # readers in other threads see one set of weights
        self.lock = threading.RLock()
        # the optimizer whose pending update (a TrainStep's, deferred) the next step
        # applies, and the thread whose step left it: the only one that may apply it
        self._deferred: Adam | None = None
        self._deferred_owner = 0
        self._train_step: TrainStep | None = None  # train_step's, for its optimizer

    # ---- shapes and checks ----------------------------------------------------------------

    def _ids(self, ids, name: str = "ids") -> np.ndarray:
        """(B, T) int32 token ids, checked against the vocabulary and max_seq_len."""
        arr = _array(ids, name)
        if arr.ndim == 1:
            arr = arr[None, :]
        if arr.ndim != 2 or arr.shape[1] == 0 or arr.shape[0] == 0:
            raise ValidationError(f"{name} has shape {arr.shape}, expected (B, T) with B, T >= 1")
        T = arr.shape[1]
        if T > self.config.max_seq_len:
            raise ValidationError(f"cannot forward a sequence of length {T}, max_seq_len is "
                                  f"only {self.config.max_seq_len}")
        return self._in_vocab(arr, name)[0]

    def _in_vocab(self, arr: np.ndarray, name: str,
                  ignore: int | None = None) -> tuple[np.ndarray, int]:
        """arr as C-contiguous int32 and how many of its ids are not `ignore`, after
        checking that every other id lies in [0, V)."""
        _integers(arr, name)
        V = self.tokenizer.size
        if arr.dtype != np.intc:  # checked before narrowing: 2**32 + 5 must not pass as 5
            ids = arr if ignore is None else arr[arr != ignore]
            if ids.size and (ids.min() < 0 or ids.max() >= V):
                raise _out_of_vocab(name, ids[(ids < 0) | (ids >= V)].flat[0], V)
        arr = np.ascontiguousarray(arr, np.intc)
        first, count = K.scan_ids(arr, V, ignore is not None, ignore or 0)
        if first >= 0:
            raise _out_of_vocab(name, arr.flat[first], V)
        return arr, count

    def _checked_batch(self, inputs, targets) -> tuple[np.ndarray, np.ndarray, int]:
        """(ids, targets, number of targets): inputs and targets (B, T) (or (T,)) as
        C-contiguous int32 after checking them (targets IGNORE_INDEX at padding, at least
        one target)."""
        ids = self._ids(inputs, "inputs")
        tgt = _integers(_array(targets, "targets"), "targets")
        if tgt.ndim == 1:
            tgt = tgt[None, :]
        if tgt.shape != ids.shape:
            raise ShapeMismatch("targets", ids.shape, tgt.shape)
        tgt, count = self._in_vocab(tgt, "targets", IGNORE_INDEX)
        if count == 0:
            raise ValidationError("targets are all padding, expected at least one target")
        return ids, tgt, count

    # ---- training -----------------------------------------------------------------------

    def _forward(self, ws: Workspace, ids: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """Logits (B, T, V) and the activations between layers, xs[i] = input of block i,
        xs[L] = the last block's output, then (pre-norm) the final norm's: xs[-1] is the
        input of the output projection (each (B, T, D), views into ws)."""
        xs = [self.embeddings.forward(ws, ids)]
        for block in self.blocks:
            xs.append(block.forward(ws, xs[-1]))
        if self.ln_f is not None:
            xs.append(self.ln_f.forward(ws, xs[-1]))
        return self.output.forward(ws, xs[-1]), xs

    def _head(self, ws: Workspace, x: np.ndarray) -> np.ndarray:
        """Logits (B, T, V) of the last block's output x (B, T, D): the final norm, if any,
        and the output projection."""
        return self.output.forward(ws, x if self.ln_f is None else self.ln_f.forward(ws, x))

    def forward(self, ids) -> np.ndarray:
        """Logits (B, T, V) for token ids (B, T) (or (T,), giving (1, T, V)); a new array."""
        ids = self._ids(ids)
        with self.reading(), self._activations_of(*ids.shape):
            return self._forward(Workspace(), ids)[0].copy()

    @contextmanager
    def _activations_of(self, B: int, T: int, held: int = 0) -> Iterator[None]:
        """Around a pass over (B, T) tokens: refuse it up front when its activations need
        more memory than is available (besides the `held` bytes its workspace holds
        already), and turn a failed allocation into a ValidationError too."""
        need = activation_bytes(self.config, self.tokenizer.size, B, T)
        what = f"LLM: the activations of a batch of {B} x {T} tokens"
        check_memory(need - held, f"{what} need")
        with allocating(what):
            yield

    def settle(self) -> None:
        """Apply the Adam update a training step left pending (``defer=True``), if any and
        if this thread's step left it; every method here that reads the parameters calls
        it first. A reader in another thread leaves it alone: it sees the weights before
        that update (the training thread applies it beside its next forward)."""
        if self._deferred is not None and threading.get_ident() == self._deferred_owner:
            with self.lock:
                if self._deferred is not None:
                    self._deferred.settle()
                    self._deferred = None

    def _defer(self, optimizer: Adam) -> None:
        """Note that `optimizer` holds a pending update made by this thread's step."""
        self._deferred, self._deferred_owner = optimizer, threading.get_ident()

    @contextmanager
    def _gradients_into(self, store: FlatParameters | None) -> Iterator[None]:
        """Around layer calls whose parameter gradients go to `store` (params.with_grad():
        the same parameters, another gradient buffer) instead of params.grad; None: to
        params.grad as always. The step that changes the gradients holds ``lock``."""
        if store is None:
            yield
            return
        self.bind(store)
        try:
            yield
        finally:
            self.bind(self.params)

    @contextmanager
    def reading(self) -> Iterator[None]:
        """Around a read of the parameters: this thread's pending update applied, and no
        training step changing them meanwhile (``lock``)."""
        self.settle()
        with self.lock:
            yield

    def loss_and_backward(self, inputs, targets, dropout_step: int = 0) -> float:
        """Mean cross-entropy of next-token prediction and its gradient, layer by layer.

        inputs, targets: (B, T); targets equal to IGNORE_INDEX (-1) are padding. Overwrites
        ``params.grad`` with d(loss)/d(params) (every layer writes its gradients over the old
        ones, so no zeroing pass is needed). Returns the loss. With config.dropout > 0 this
        is a training step: its dropout masks come from the model's seed and `dropout_step`
        (an integer >= 0; rustgpt.step.TrainStep passes the optimizer's step number, which
        checkpoints keep, so a resumed run draws the same masks). Training loops use a
        TrainStep (or ``train_step``), which records and replays the kernel calls."""
        if isinstance(dropout_step, bool) or not isinstance(dropout_step, (int, np.integer)) \
                or dropout_step < 0:
            raise ValidationError(f"loss_and_backward: dropout_step = {dropout_step!r}, "
                                  f"expected an integer >= 0")
        ids, tgt, count = self._checked_batch(inputs, targets)
        ws = Workspace(dropout_seed(self.seed, dropout_step) if self.config.dropout > 0
                       else None)
        with self.reading(), self._activations_of(*ids.shape):
            losses = self._loss_and_backward(ws, ids, tgt, 1.0 / count, False)[0]
        return float(losses.sum(dtype=np.float64) / count)

    def _loss_and_backward(self, ws: Workspace, ids: np.ndarray, tgt: np.ndarray,
                           scale: float, accumulate: bool, plan: K.Plan | None = None
                           ) -> tuple[np.ndarray, np.ndarray, int]:
        """Forward, loss and backward as kernel calls (recorded into `plan` if given): the
        per-position losses (B*T,) and hits (B*T,) (1 where the prediction was right), and
        the number of calls the forward made. The loss's gradient is scaled by `scale` (1 /
        the step's number of targets); `accumulate` adds the gradients to params.grad
        instead of overwriting them."""
        logits, xs = self._forward(ws, ids)
        forward = len(plan) if plan is not None else 0
        B, T, V = logits.shape
        losses = ws.get("losses", (B * T,))
        hits = ws.get("hits", (B * T,)).view(np.intc)  # the float32 scratch, as int32
        # dlogits overwrite the logits in place: (softmax - onehot) / count
        K.crossentropy_forward_backward(losses, _rows(logits), hits, _rows(logits),
                                        tgt.reshape(-1), IGNORE_INDEX, scale)
        dx = self.output.backward(ws, xs[-1], logits, accumulate=accumulate)
        if self.ln_f is not None:
            dx = self.ln_f.backward(ws, xs[-2], dx, accumulate=accumulate)
        L = len(self.blocks)
        for block, x in zip(reversed(self.blocks), reversed(xs[:L])):
            dx = block.backward(ws, x, dx, accumulate=accumulate)
        # a tied output projection has written its part of the token gradient: add to it
        self.embeddings.backward(ws, ids, dx, accumulate=(
            accumulate or self.output.tied is not None, accumulate))
        return losses, hits, forward

    def loss(self, inputs, targets) -> tuple[float, int, int]:
        """(summed loss, number of targets, number predicted correctly) without gradients."""
        ids = self._ids(inputs, "inputs")
        tgt = _integers(_array(targets, "targets"), "targets")
        if tgt.size != ids.size:
            raise ShapeMismatch("targets", ids.shape, tgt.shape)
        tgt = self._in_vocab(tgt.reshape(ids.shape), "targets", IGNORE_INDEX)[0]
        with self.reading(), self._activations_of(*ids.shape):
            losses, hits = self._loss(Workspace(), ids, tgt)
        count = int(np.count_nonzero(tgt != IGNORE_INDEX))
        return float(losses.sum(dtype=np.float64)), count, int(np.count_nonzero(hits))

    def _loss(self, ws: Workspace, ids: np.ndarray, tgt: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray]:
        """Forward and loss as kernel calls, without gradients: the per-position losses
        (B*T,) and hits (B*T,) (1 where the prediction was right), views into ws."""
        logits = self._forward(ws, ids)[0]
        B, T, _ = logits.shape
        losses = ws.get("losses", (B * T,))
        hits = ws.get("hits", (B * T,)).view(np.intc)  # the float32 scratch, as int32
        K.crossentropy_forward(losses, hits, _rows(logits), tgt.reshape(-1), IGNORE_INDEX)
        return losses, hits

    def grad_norm(self) -> float:
        """Global L2 norm of the gradient buffer."""
        return math.sqrt(K.sum_squares(self.params.grad))

    def train_step(self, inputs, targets, optimizer: Adam, lr: float,
                   max_grad_norm: float | None = 5.0, defer: bool = False) -> tuple[float, float]:
        """One step on one batch: ``TrainStep(self, optimizer, max_grad_norm).run([(inputs,
        targets)], lr, defer)`` (see rustgpt.step), the TrainStep kept while the same
        optimizer is passed, so its recorded plans are replayed. Returns (loss, gradient
        norm before clipping)."""
        from rustgpt.step import TrainStep  # the training step builds on the model

        step = self._train_step
        if step is None or step.optimizer is not optimizer:
            step = self._train_step = TrainStep(self, optimizer)
        step.max_grad_norm = max_grad_norm
        return step.run([(inputs, targets)], lr, defer)

    # ---- generation (KV cache) --------------------------------------------------------------

    def new_cache(self, batch: int = 1) -> KVCache:
        """An empty KV cache for `batch` sequences of up to max_seq_len tokens; raises
        ValidationError when it would not fit in memory."""
        c = self.config
        with allocating(f"LLM: a KV cache of {batch} x {c.max_seq_len} positions"):
            return KVCache(c.num_layers, batch, c.max_seq_len, c.embedding_dim)

    def decoding_bytes(self, batch: int, prompt_len: int) -> int:
        """Bytes that decoding `batch` rows of a `prompt_len`-token prompt needs, about: the
        KV cache (2 L B T_max D float32), the decoding step's attention scores (B NH T_max)
        and the prompt's activations."""
        c = self.config
        cache = 4 * batch * c.max_seq_len * (2 * c.num_layers * c.embedding_dim + c.num_heads)
        return cache + activation_bytes(c, self.tokenizer.size, batch, prompt_len)

    @_reads
    def prefill(self, cache: KVCache, ids) -> np.ndarray:
        """Run the prompt ids (B, T) through the model, filling cache rows 0..T-1.
        Returns the last position's logits (B, V), a view into the cache's workspace."""
        ids = self._ids(ids)
        B, T = ids.shape
        if B != cache.batch:
            raise ShapeMismatch("prompt ids", (cache.batch, T), ids.shape)
        ws = cache.workspace
        x = self.embeddings.forward(ws, ids)
        for layer, block in enumerate(self.blocks):
            x = block.forward(ws, x)
            cache.k[layer, :, :T] = ws.get(block.attn.key("k"), (B, T, x.shape[2]))
            cache.v[layer, :, :T] = ws.get(block.attn.key("v"), (B, T, x.shape[2]))
        cache.lengths[:] = T
        last = ws.get("prefill.last", (B, 1, x.shape[2]))
        last[...] = x[:, T - 1:T]
        return self._head(ws, last)[:, 0]

    @_reads
    def step(self, cache: KVCache, ids) -> np.ndarray:
        """Append one token per batch row (ids: (B,)), row b's at its own position
        cache.lengths[b] (rows of different lengths decode together; each row's logits are
        those it would get alone). Returns their logits (B, V), a view into the cache's
        workspace."""
        n = cache.lengths
        if n.max() >= self.config.max_seq_len:
            raise ValidationError(f"cannot decode position {n.max()}: max_seq_len is "
                                  f"{self.config.max_seq_len}")
        ids = self._in_vocab(np.asarray(ids).reshape(-1), "step ids")[0]
        if ids.shape[0] != cache.batch:
            raise ShapeMismatch("step ids", (cache.batch,), ids.shape)
        ws, B, D = cache.workspace, cache.batch, self.config.embedding_dim
        x = ws.get("step.x", (B, 1, D))
        # embedding of token ids at positions n: token[id] + position[n]
        np.add(self.embeddings.token[ids], self.embeddings.position[n], out=x[:, 0])
        for layer, block in enumerate(self.blocks):
            x = block.step(ws, x, cache.k[layer], cache.v[layer], n)
        n += 1
        return self._head(ws, x)[:, 0]

    def generate(self, prompt: str, **options) -> str:
        """Answer `prompt` (a chat-tuned model, word tokenizer: prefixed with "User: ",
        greedy, stop at </s>, as RustGPT) or continue it (a text model). Options are those
        of ``rustgpt.generation.generate``."""
        from rustgpt.generation import generate  # generation builds on the model

        return generate(self, prompt, **options)

    # ---- state ----------------------------------------------------------------------------

    def total_parameters(self) -> int:
        """Number of parameters (P)."""
        return int(self.params.data.size)

    def named_parameters(self) -> Iterator[tuple[str, np.ndarray]]:
        """(name, array) of every parameter, views into the flat buffer."""
        self.settle()
        yield from self.params.values.items()

    @_reads
    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of every parameter by name (``blocks.0.attn.wq`` ...)."""
        return {name: value.copy() for name, value in self.params.values.items()}

    @_reads  # a pending step applied later would change the loaded values
    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Copy named arrays into the parameters; every name must be present with its shape."""
        expected = self.params.values
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValidationError(f"state dict: missing {missing[:5]}, unexpected "
                                  f"{unexpected[:5]}")
        for name, value in state.items():
            arr = np.asarray(value)
            if arr.shape != expected[name].shape:
                raise ShapeMismatch(f"state dict: {name}", expected[name].shape, arr.shape)
            expected[name][...] = arr

    def network_description(self) -> str:
        """One line per layer with its parameter count, then the total."""
        c = self.config
        options = [f"{c.norm}-norm", c.activation]
        options += ["attention projection"] * c.attention_projection
        options += ["tied embeddings"] * c.tie_embeddings + ["no biases"] * (not c.bias)
        options += [f"dropout {c.dropout:g}"] * (c.dropout > 0)
        lines = [f"LLM: vocab {self.tokenizer.size}, embedding_dim {c.embedding_dim}, hidden_dim "
                 f"{c.hidden_dim}, {c.num_layers} layers, {c.num_heads} heads, max_seq_len "
                 f"{c.max_seq_len}, arch {c.arch} ({', '.join(options)})"]
        for name, module in self._children.items():
            lines.append(f"  {name:<12} {type(module).__name__:<18} {module.parameters():>10,}")
        lines.append(f"  total parameters {self.total_parameters():,}")
        return "\n".join(lines)
