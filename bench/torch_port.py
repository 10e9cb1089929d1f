"""The rustgpt model in PyTorch: the "PyTorch" column of bench/ and the port the tests check
rustgpt against (as llm.c's test_gpt2.c checks against PyTorch).

Same architecture and parameter names as rustgpt (``blocks.0.attn.wq`` ...), weights stored
(in, out) and used as ``x @ W``, so a rustgpt state dict or checkpoint loads as it is.
Needs torch (``pip install torch==2.13.0``); nothing else in rustgpt imports this module.

Also nanoGPT's training loop on a text corpus (its CPU shakespeare_char recipe) with
rustgpt's schedule, run as a process of its own by bench/compare.py's own-text workload:

    python -m bench.torch_port own-text --text CORPUS [the options of `rustgpt-cli train`]

With --precision bf16 its training steps and loss estimates run under torch.autocast
(bfloat16); its final evaluation of the val split stays float32, as `rustgpt-cli eval`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -1  # padded targets, as rustgpt.model.IGNORE_INDEX
LN_EPS = 1e-5


def _normal(shape: tuple[int, ...], std: float) -> nn.Parameter:
    return nn.Parameter(torch.randn(shape) * std)


class Embeddings(nn.Module):
    """x = token[ids] + position[0:T]. token (V, D), position (T_max, D)."""

    def __init__(self, V: int, D: int, T_max: int) -> None:
        super().__init__()
        self.token = _normal((V, D), 0.02)
        self.position = _normal((T_max, D), 0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        T = ids.shape[1]
        return self.token[ids] + self.position[:T]  # (B, T, D)


class SelfAttention(nn.Module):
    """Causal multi-head attention. wq, wk, wv (D, D); with `projection` then a wo + bo
    (wo (D, D), bo (D,) with `bias`), without it RustGPT's."""

    def __init__(self, D: int, NH: int, projection: bool = False, bias: bool = False) -> None:
        super().__init__()
        self.num_heads = NH
        self.wq, self.wk, self.wv = (_normal((D, D), (2.0 / D) ** 0.5) for _ in range(3))
        self.wo = _normal((D, D), (2.0 / D) ** 0.5) if projection else None
        self.bo = nn.Parameter(torch.zeros(D)) if projection and bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        NH = self.num_heads
        split = lambda a: a.view(B, T, NH, D // NH).transpose(1, 2)  # (B, NH, T, hs)
        q, k, v = split(x @ self.wq), split(x @ self.wk), split(x @ self.wv)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # scale 1/sqrt(hs)
        a = a.transpose(1, 2).reshape(B, T, D)
        if self.wo is None:
            return a
        return a @ self.wo + self.bo if self.bo is not None else a @ self.wo


class FeedForward(nn.Module):
    """act(x W1 + b1) W2 + b2, act relu or gelu (exact). w1 (D, H), w2 (H, D), biases with
    `bias`."""

    def __init__(self, D: int, H: int, activation: str = "relu", bias: bool = True) -> None:
        super().__init__()
        self.act = torch.relu if activation == "relu" else F.gelu  # F.gelu: the erf form
        self.w1 = _normal((D, H), (2.0 / D) ** 0.5)
        self.b1 = nn.Parameter(torch.zeros(H)) if bias else None
        self.w2 = _normal((H, D), (2.0 / H) ** 0.5)
        self.b2 = nn.Parameter(torch.zeros(D)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x @ self.w1
        h = self.act(u if self.b1 is None else u + self.b1)
        y = h @ self.w2
        return y if self.b2 is None else y + self.b2


class LayerNorm(nn.Module):
    def __init__(self, D: int, bias: bool = True) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(D))
        self.beta = nn.Parameter(torch.zeros(D)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.gamma, self.beta, LN_EPS)


class TransformerBlock(nn.Module):
    """Post-norm, as RustGPT: x = LN1(x + attn(x)); x = LN2(x + ffn(x)); or pre-norm, as
    GPT-2: x = x + attn(LN1(x)); x = x + ffn(LN2(x)). With dropout (in train mode), on each
    sub-layer's output before its residual add (rustgpt's sites; torch's own masks)."""

    def __init__(self, D: int, H: int, NH: int, norm: str = "post", activation: str = "relu",
                 projection: bool = False, bias: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm = norm
        self.drop = nn.Dropout(dropout)
        attn = SelfAttention(D, NH, projection, bias)
        ffn = FeedForward(D, H, activation, bias)
        ln1, ln2 = LayerNorm(D, bias), LayerNorm(D, bias)
        # registered in rustgpt's parameter order (pre-norm: the order the forward reads)
        order = ((("ln1", ln1), ("attn", attn), ("ln2", ln2), ("ffn", ffn)) if norm == "pre"
                 else (("attn", attn), ("ln1", ln1), ("ffn", ffn), ("ln2", ln2)))
        for name, module in order:
            self.add_module(name, module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm == "pre":
            x = x + self.drop(self.attn(self.ln1(x)))
            return x + self.drop(self.ffn(self.ln2(x)))
        x = self.ln1(x + self.drop(self.attn(x)))
        return self.ln2(x + self.drop(self.ffn(x)))


class OutputProjection(nn.Module):
    """logits = x w + b, or with `tied` (the Embeddings) x token^T + b; b with `bias`."""

    def __init__(self, D: int, V: int, bias: bool = True, tied: Embeddings | None = None) -> None:
        super().__init__()
        self.tied = [tied] if tied is not None else None  # a list: not a second submodule
        self.w = _normal((D, V), (2.0 / D) ** 0.5) if tied is None else None
        self.b = nn.Parameter(torch.zeros(V)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ (self.w if self.tied is None else self.tied[0].token.T)
        return y if self.b is None else y + self.b


class TorchGPT(nn.Module):
    """rustgpt's LLM in PyTorch, with its architecture options (rustgpt.config.ModelConfig's
    keys; arch picks the init as rustgpt's does; dropout applies in train mode, with
    torch's masks); ``state_dict()`` keys equal rustgpt's parameter names, in its order."""

    def __init__(self, vocab_size: int, embedding_dim: int = 128, hidden_dim: int = 256,
                 num_layers: int = 3, num_heads: int = 1, max_seq_len: int = 80,
                 arch: str = "rustgpt", norm: str = "post", activation: str = "relu",
                 attention_projection: bool = False, tie_embeddings: bool = False,
                 bias: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        D = embedding_dim
        self.max_seq_len = max_seq_len
        self.embeddings = Embeddings(vocab_size, D, max_seq_len)
        self.drop = nn.Dropout(dropout)  # on the embeddings, in train mode
        self.blocks = nn.ModuleList(TransformerBlock(D, hidden_dim, num_heads, norm, activation,
                                                     attention_projection, bias, dropout)
                                    for _ in range(num_layers))
        self.ln_f = LayerNorm(D, bias) if norm == "pre" else None
        self.output = OutputProjection(D, vocab_size, bias,
                                       self.embeddings if tie_embeddings else None)
        if arch == "gpt":  # nanoGPT's init: weights N(0, 0.02), residual projections scaled
            with torch.no_grad():
                for name, p in self.named_parameters():
                    if p.dim() == 2:
                        residual = name.endswith(("attn.wo", "ffn.w2"))
                        p.normal_(0.0, 0.02 / (2 * num_layers) ** 0.5 if residual else 0.02)
        self.optimizer: torch.optim.Optimizer | None = None

    def forward(self, ids) -> torch.Tensor:
        """Logits (B, T, V) of token ids (B, T)."""
        x = self.drop(self.embeddings(_long(ids)))
        for block in self.blocks:
            x = block(x)
        if self.ln_f is not None:
            x = self.ln_f(x)
        return self.output(x)

    def loss(self, inputs, targets) -> torch.Tensor:
        """Mean cross-entropy over targets != -1 (a scalar tensor with its graph)."""
        logits = self(inputs)
        return F.cross_entropy(logits.flatten(0, 1), _long(targets).flatten(),
                               ignore_index=IGNORE_INDEX)

    def make_optimizer(self, lr: float = 5e-4, weight_decay: float = 0.0,
                       betas: tuple[float, float] = (0.9, 0.999),
                       eps: float = 1e-8) -> torch.optim.Optimizer:
        """Adam as rustgpt trains (defaults: RustGPT's, no weight decay), in the fused CPU
        kernel, PyTorch's fastest. With weight decay, nanoGPT's AdamW: two parameter
        groups, the decay on the parameters of two or more dimensions only (matrices and
        embeddings, not biases or layer norms), as rustgpt's decay ranges. Without it one
        group of Adam, as before: a second group adds about 0.2 ms (10-15%) to each
        optimizer step of the default model."""
        if weight_decay == 0.0:
            self.optimizer = torch.optim.Adam(self.parameters(), lr=lr, betas=betas, eps=eps,
                                              fused=True)
            return self.optimizer
        params = list(self.parameters())
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr,
                                           betas=betas, eps=eps, fused=True)
        return self.optimizer

    def train_step(self, inputs, targets, lr: float, max_grad_norm: float = 5.0,
                   autocast: bool = False) -> tuple[float, float]:
        """Loss, backward, clip to global L2 norm `max_grad_norm`, one Adam step at `lr`.
        Returns (loss, gradient norm before clipping), like rustgpt's LLM.train_step. With
        `autocast`, the forward and loss run under torch.autocast("cpu", bfloat16) (mixed
        precision: bf16 matmuls, float32 weights; the backward follows the forward's
        dtypes)."""
        opt = self.optimizer or self.make_optimizer(lr)
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = self.loss(inputs, targets)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.parameters(), max_grad_norm)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        return loss.item(), norm.item()

    @torch.no_grad()
    def generate_no_cache(self, ids, max_tokens: int) -> list[int]:
        """Greedy decoding that recomputes the whole prefix for every new token (no KV
        cache); never stops early. ids: prompt token ids (T,). Returns the new ids."""
        seq = torch.as_tensor(np.asarray(ids), dtype=torch.long).view(1, -1)
        if seq.shape[1] + max_tokens > self.max_seq_len:
            raise ValueError(f"generate_no_cache: prompt of {seq.shape[1]} + {max_tokens} "
                             f"tokens exceeds max_seq_len {self.max_seq_len}")
        new = []
        for _ in range(max_tokens):
            token = self(seq)[0, -1].argmax()
            new.append(int(token))
            seq = torch.cat([seq, token.view(1, 1)], dim=1)
        return new

    def load_rustgpt_state(self, state: dict) -> None:
        """Copy rustgpt's named arrays (numpy or torch) into the parameters."""
        tensors = {name: torch.as_tensor(np.asarray(value, np.float32)) for name, value in state.items()}
        self.load_state_dict(tensors, strict=True)


def _long(ids) -> torch.Tensor:
    if isinstance(ids, torch.Tensor):
        t = ids.long()
    else:
        t = torch.as_tensor(np.asarray(ids), dtype=torch.long)
    return t.view(1, -1) if t.dim() == 1 else t


def from_rustgpt(source) -> TorchGPT:
    """A TorchGPT with the weights of a rustgpt LLM, or of a checkpoint file read with
    ``safetensors.torch`` (weights) and its header metadata (the JSON config)."""
    if isinstance(source, (str, os.PathLike)):
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(source)
        with safe_open(str(path), framework="pt") as f:
            model_cfg = json.loads(f.metadata()["config"])["model"]
        weights = {k: v for k, v in load_file(str(path)).items() if not k.startswith("optim.")}
    else:
        import attrs

        model_cfg = attrs.asdict(source.config)
        weights = source.params.values
    port = TorchGPT(weights["embeddings.token"].shape[0], **model_cfg)
    port.load_rustgpt_state(weights)
    return port


# ---- nanoGPT's training loop on a text corpus ------------------------------------------------

def text_splits(text: str | os.PathLike, seq_len: int, val_fraction: float,
                cache_dir: str | os.PathLike) -> tuple:
    """(tokenizer, train, val) of the corpus at `text` under a char tokenizer (the sorted
    characters of the corpus and <unk>), learnt and applied by rustgpt itself, as
    `rustgpt-cli train --text` does, so that both see the same ids (the token file goes to
    `cache_dir`). train is the first int(n (1 - val_fraction)) tokens (nanoGPT's split),
    val the rest; int64 tensors."""
    from rustgpt.corpus import TokenFile, find_sources, pieces
    from rustgpt.tokenizer import train_tokenizer

    tokenizer = train_tokenizer("char", pieces(find_sources([text])))
    train, val = TokenFile.build([text], tokenizer, cache_dir).split(seq_len, val_fraction)
    return tokenizer, *(torch.from_numpy(np.asarray(s, np.int64)) for s in (train, val))


def get_batch(data: torch.Tensor, batch_size: int, seq_len: int,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """nanoGPT's get_batch: `batch_size` (B) windows of `seq_len` (T) + 1 consecutive tokens
    of `data` (n,) at offsets drawn from `generator`: (inputs, targets), each (B, T)."""
    starts = torch.randint(len(data) - seq_len, (batch_size,), generator=generator)  # (B,)
    windows = data[starts[:, None] + torch.arange(seq_len + 1)]  # (B, T + 1)
    return windows[:, :-1], windows[:, 1:]


def cosine_lr(step: int, lr: float, warmup: int, total_steps: int) -> float:
    """rustgpt's cosine schedule (Trainer.lr_at) at `step` of `total_steps`: linear warmup
    to `lr` over `warmup` steps, then cosine decay to 10% of it at the last step (nanoGPT's
    get_lr, whose warmup divides by warmup + 1)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min((step - warmup) / max(total_steps - warmup, 1), 1.0)
    return lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


@torch.no_grad()
def estimate_loss(port: TorchGPT, splits: dict, eval_iters: int, batch_size: int,
                  generator: torch.Generator, autocast: bool = False) -> dict:
    """nanoGPT's estimate_loss: each split's mean loss over `eval_iters` random batches,
    the model in eval mode (no dropout), then back in train mode; with `autocast`, under
    torch.autocast("cpu", bfloat16) as nanoGPT's estimates run in its training dtype."""
    port.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        losses = {name: float(np.mean([port.loss(*get_batch(data, batch_size,
                                                             port.max_seq_len,
                                                             generator)).item()
                                       for _ in range(eval_iters)]))
                  for name, data in splits.items()}
    port.train()
    return losses


class AsRustgpt:
    """The port as rustgpt.training.evaluate_text reads a model (config.max_seq_len,
    tokenizer, loss), so the port's loss over a whole split is computed exactly as
    `rustgpt-cli eval --text` computes rustgpt's."""

    def __init__(self, port: TorchGPT, tokenizer) -> None:
        self.port, self.tokenizer = port, tokenizer
        self.config = SimpleNamespace(max_seq_len=port.max_seq_len)

    @torch.no_grad()
    def loss(self, inputs, targets) -> tuple[float, int, int]:
        """(summed loss, number of targets, number predicted right) over targets != -1,
        as rustgpt's LLM.loss."""
        logits = self.port.eval()(inputs).flatten(0, 1)  # (B T, V)
        targets = _long(targets).flatten()
        kept = targets != IGNORE_INDEX
        summed = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
        right = (logits.argmax(-1) == targets) & kept
        return summed.item(), int(kept.sum()), int(right.sum())


def train_text(port: TorchGPT, train: torch.Tensor, val: torch.Tensor, *, batch_size: int,
               max_iters: int, lr: float, warmup_steps: int, weight_decay: float, beta2: float,
               max_grad_norm: float, eval_interval: int, eval_iters: int, seed: int,
               autocast: bool = False, log=None) -> dict:
    """nanoGPT's loop: `max_iters` steps, each on a batch of random windows of `train`
    (loss, backward, clip to `max_grad_norm`, AdamW with decay on the 2-D parameters at
    cosine_lr), the train and val losses estimated after every `eval_interval` steps and
    after the last, as rustgpt's trainer does (nanoGPT estimates before the first step
    too). Batches and estimates draw from one generator seeded with `seed`; with
    `autocast`, the steps and the estimates run under torch.autocast("cpu", bfloat16)
    (TorchGPT.train_step's mixed precision). Returns
    {"estimates": [(steps done, train, val)], "step_seconds" (the steps alone),
    "loop_seconds"}; `log(message)`, when given, hears each estimate."""
    generator = torch.Generator().manual_seed(seed)
    port.make_optimizer(lr, weight_decay=weight_decay, betas=(0.9, beta2))
    port.train()
    estimates, step_seconds = [], 0.0
    began = time.perf_counter()
    for step in range(max_iters):
        inputs, targets = get_batch(train, batch_size, port.max_seq_len, generator)
        start = time.perf_counter()
        port.train_step(inputs, targets, cosine_lr(step, lr, warmup_steps, max_iters),
                        max_grad_norm, autocast)
        step_seconds += time.perf_counter() - start
        done = step + 1
        if done % eval_interval == 0 or done == max_iters:
            losses = estimate_loss(port, {"train": train, "val": val}, eval_iters, batch_size,
                                   generator, autocast)
            estimates.append((done, losses["train"], losses["val"]))
            if log:
                log(f"step {done}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
    return {"estimates": estimates, "step_seconds": step_seconds,
            "loop_seconds": time.perf_counter() - began}


def own_text(args: argparse.Namespace) -> dict:
    """The own-text workload's PyTorch side (see main): the corpus, the model (rustgpt's
    ModelConfig of `--arch`, torch seeded with `--seed`), train_text (under autocast with
    `--precision bf16`), then the loss over the whole val split in float32 as `rustgpt-cli
    eval --text ... --split val` computes it."""
    import attrs

    from rustgpt.config import ModelConfig
    from rustgpt.training import evaluate_text

    torch.set_num_threads(args.threads)
    tokenizer, train, val = text_splits(args.text, args.max_seq_len, args.val_fraction,
                                        args.cache_dir)
    config = ModelConfig(embedding_dim=args.embedding_dim, hidden_dim=args.hidden_dim,
                         num_layers=args.num_layers, num_heads=args.num_heads,
                         max_seq_len=args.max_seq_len, arch=args.arch)
    torch.manual_seed(args.seed)
    port = TorchGPT(tokenizer.size, **attrs.asdict(config))
    result = train_text(port, train, val, batch_size=args.batch_size, max_iters=args.max_iters,
                        lr=args.pretraining_lr, warmup_steps=args.warmup_steps,
                        weight_decay=args.weight_decay, beta2=args.beta2,
                        max_grad_norm=args.max_grad_norm, eval_interval=args.eval_interval,
                        eval_iters=args.eval_iters, seed=args.seed,
                        autocast=args.precision == "bf16",
                        log=lambda message: print(message, file=sys.stderr, flush=True))
    start = time.perf_counter()
    result["val"] = evaluate_text(AsRustgpt(port, tokenizer), val.numpy())
    result["val_seconds"] = time.perf_counter() - start
    result.update(vocab_size=tokenizer.size, train_tokens=len(train), val_tokens=len(val),
                  parameters=sum(p.numel() for p in port.parameters()))
    return result


def main(argv: list[str] | None = None) -> None:
    """`python -m bench.torch_port own-text --text CORPUS ...`: own_text with the options
    of `rustgpt-cli train` that the recipe sets (the same names; the lr is
    --pretraining-lr, the schedule always cosine) and --precision (fp32, or bf16: the port
    under autocast); prints its result as one JSON line."""
    parser = argparse.ArgumentParser(prog="python -m bench.torch_port",
                                     description=main.__doc__.split(";")[0])
    parser.add_argument("workload", choices=["own-text"])
    parser.add_argument("--text", required=True, help="the corpus file")
    parser.add_argument("--cache-dir", required=True, help="where the token file goes")
    parser.add_argument("--arch", default="gpt", choices=["rustgpt", "gpt"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                        help="bf16: training steps and loss estimates under torch.autocast "
                             "(default %(default)s)")
    for name, kind, default in (
            ("num-layers", int, 4), ("num-heads", int, 4), ("embedding-dim", int, 128),
            ("hidden-dim", int, 512), ("max-seq-len", int, 64), ("batch-size", int, 12),
            ("max-iters", int, 2000), ("pretraining-lr", float, 1e-3), ("warmup-steps", int, 100),
            ("weight-decay", float, 0.1), ("beta2", float, 0.99), ("max-grad-norm", float, 1.0),
            ("eval-interval", int, 250), ("eval-iters", int, 20), ("val-fraction", float, 0.1),
            ("threads", int, 2), ("seed", int, 42)):
        parser.add_argument(f"--{name}", type=kind, default=default,
                            help="default %(default)s")
    print(json.dumps(own_text(parser.parse_args(argv))))


if __name__ == "__main__":
    main()
