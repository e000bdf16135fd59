"""Character language models: ``char_transformer`` and ``lstm_lm``.

Each maps token ids ``[B, T]`` (int64, ``< vocab_size``) to next-token logits
``[B, T, vocab_size]``; position ``t`` sees tokens ``0..t`` only. Weights come from the global
torch RNG only: seed it first and the same arguments give the same weights.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CharTransformer", "LSTMLanguageModel"]


class _Block(nn.Module):
    """Pre-LN transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, *, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )
        self.drop = nn.Dropout(dropout)

    def _attend(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = (
            z.view(b, t, self.heads, c // self.heads).transpose(1, 2)
            for z in self.qkv(x).split(c, dim=2)
        )
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        return y.transpose(1, 2).reshape(b, t, c)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop(self.proj(self._attend(self.ln1(x))))
        return x + self.drop(self.mlp(self.ln2(x)))


class CharTransformer(nn.Module):
    """A small decoder-only (GPT-style) transformer with a causal mask.

    Token and learned position embeddings, ``depth`` pre-LN blocks (causal multi-head
    self-attention, 4x GELU MLP), a final LayerNorm and a linear head. Initialised as in GPT-2:
    N(0, 0.02) weights, residual projections scaled by ``1 / sqrt(2 * depth)``.

    Args:
        vocab_size: tokens.
        seq_len: longest input (positions with an embedding).
        width: embedding size (default 128); must divide by ``heads``.
        depth: transformer blocks (default 2).
        heads: attention heads (default 4).
        dropout: dropout on embeddings, attention weights and residual branches.
    """

    def __init__(
        self,
        *,
        vocab_size: int,
        seq_len: int,
        width: int = 128,
        depth: int = 2,
        heads: int = 4,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.seq_len = seq_len
        self.tok = nn.Embedding(vocab_size, width)
        self.pos = nn.Embedding(seq_len, width)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            _Block(width=width, heads=heads, dropout=dropout) for _ in range(depth)
        )
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size)
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() > 1:  # LayerNorm weights stay 1
                std = 0.02 / math.sqrt(2 * depth) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, std=std)
        for block in self.blocks:  # the MLP's output layer is a residual projection too
            nn.init.normal_(block.get_parameter("mlp.2.weight"), std=0.02 / math.sqrt(2 * depth))

    def forward(self, idx: Tensor) -> Tensor:
        t = idx.shape[1]
        if t > self.seq_len:
            raise ValueError(f"sequence of {t} tokens is longer than seq_len {self.seq_len}")
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.tok(idx) + self.pos(pos))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


class LSTMLanguageModel(nn.Module):
    """Embedding, a multi-layer LSTM and a linear decoder: the DGC paper's PTB model shape.

    Dropout is applied to the embeddings, between LSTM layers and before the decoder
    (Zaremba et al., 2014). Embedding and decoder weights start at U(-0.1, 0.1). Every forward
    pass starts from a zero state (no state is carried between batches).

    Args:
        vocab_size: tokens.
        width: embedding and hidden size (default 256).
        depth: LSTM layers (default 2).
        dropout: dropout probability.
    """

    def __init__(
        self, *, vocab_size: int, width: int = 256, depth: int = 2, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, width)
        self.drop = nn.Dropout(dropout)
        self.lstm = nn.LSTM(
            width, width, depth, batch_first=True, dropout=dropout if depth > 1 else 0.0
        )
        self.decoder = nn.Linear(width, vocab_size)
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        nn.init.uniform_(self.decoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)

    def forward(self, idx: Tensor) -> Tensor:
        out, _ = self.lstm(self.drop(self.embed(idx)))
        return self.decoder(self.drop(out))
