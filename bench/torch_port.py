"""The rustgpt model in PyTorch: the "PyTorch" column of bench/ and the port the tests check
rustgpt against (as llm.c's test_gpt2.c checks against PyTorch).

Same architecture and parameter names as rustgpt (``blocks.0.attn.wq`` ...), weights stored
(in, out) and used as ``x @ W``, so a rustgpt state dict or checkpoint loads as it is.
Needs torch (``pip install torch==2.13.0``); nothing else in rustgpt imports this module.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

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
    """Causal multi-head attention, no output projection. wq, wk, wv (D, D)."""

    def __init__(self, D: int, NH: int) -> None:
        super().__init__()
        self.num_heads = NH
        self.wq, self.wk, self.wv = (_normal((D, D), (2.0 / D) ** 0.5) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        NH = self.num_heads
        split = lambda a: a.view(B, T, NH, D // NH).transpose(1, 2)  # (B, NH, T, hs)
        q, k, v = split(x @ self.wq), split(x @ self.wk), split(x @ self.wv)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # scale 1/sqrt(hs)
        return a.transpose(1, 2).reshape(B, T, D)


class FeedForward(nn.Module):
    """relu(x W1 + b1) W2 + b2. w1 (D, H), w2 (H, D)."""

    def __init__(self, D: int, H: int) -> None:
        super().__init__()
        self.w1 = _normal((D, H), (2.0 / D) ** 0.5)
        self.b1 = nn.Parameter(torch.zeros(H))
        self.w2 = _normal((H, D), (2.0 / H) ** 0.5)
        self.b2 = nn.Parameter(torch.zeros(D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ self.w1 + self.b1) @ self.w2 + self.b2


class LayerNorm(nn.Module):
    def __init__(self, D: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(D))
        self.beta = nn.Parameter(torch.zeros(D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.gamma, self.beta, LN_EPS)


class TransformerBlock(nn.Module):
    """Post-norm, as RustGPT: x = LN1(x + attn(x)); x = LN2(x + ffn(x))."""

    def __init__(self, D: int, H: int, NH: int) -> None:
        super().__init__()
        self.attn = SelfAttention(D, NH)
        self.ln1 = LayerNorm(D)
        self.ffn = FeedForward(D, H)
        self.ln2 = LayerNorm(D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln1(x + self.attn(x))
        return self.ln2(x + self.ffn(x))


class OutputProjection(nn.Module):
    def __init__(self, D: int, V: int) -> None:
        super().__init__()
        self.w = _normal((D, V), (2.0 / D) ** 0.5)
        self.b = nn.Parameter(torch.zeros(V))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w + self.b


class TorchGPT(nn.Module):
    """rustgpt's LLM in PyTorch; ``state_dict()`` keys equal rustgpt's parameter names."""

    def __init__(self, vocab_size: int, embedding_dim: int = 128, hidden_dim: int = 256,
                 num_layers: int = 3, num_heads: int = 1, max_seq_len: int = 80) -> None:
        super().__init__()
        self.max_seq_len = max_seq_len
        self.embeddings = Embeddings(vocab_size, embedding_dim, max_seq_len)
        self.blocks = nn.ModuleList(TransformerBlock(embedding_dim, hidden_dim, num_heads)
                                    for _ in range(num_layers))
        self.output = OutputProjection(embedding_dim, vocab_size)
        self.optimizer: torch.optim.Adam | None = None

    def forward(self, ids) -> torch.Tensor:
        """Logits (B, T, V) of token ids (B, T)."""
        x = self.embeddings(_long(ids))
        for block in self.blocks:
            x = block(x)
        return self.output(x)

    def loss(self, inputs, targets) -> torch.Tensor:
        """Mean cross-entropy over targets != -1 (a scalar tensor with its graph)."""
        logits = self(inputs)
        return F.cross_entropy(logits.flatten(0, 1), _long(targets).flatten(),
                               ignore_index=IGNORE_INDEX)

    def make_optimizer(self, lr: float = 5e-4) -> torch.optim.Adam:
        """Adam as rustgpt trains (beta1 0.9, beta2 0.999, eps 1e-8, no weight decay); the
        fused CPU kernel, PyTorch's fastest Adam."""
        self.optimizer = torch.optim.Adam(self.parameters(), lr=lr, betas=(0.9, 0.999),
                                          eps=1e-8, fused=True)
        return self.optimizer

    def train_step(self, inputs, targets, lr: float, max_grad_norm: float = 5.0) -> tuple[float, float]:
        """Loss, backward, clip to global L2 norm `max_grad_norm`, one Adam step at `lr`.
        Returns (loss, gradient norm before clipping), like rustgpt's LLM.train_step."""
        opt = self.optimizer or self.make_optimizer(lr)
        opt.zero_grad(set_to_none=True)
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
        model_cfg = {k: getattr(source.config, k) for k in
                     ("embedding_dim", "hidden_dim", "num_layers", "num_heads", "max_seq_len")}
        weights = source.params.values
    port = TorchGPT(weights["output.b"].shape[0], **model_cfg)
    port.load_rustgpt_state(weights)
    return port
