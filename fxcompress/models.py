"""Small built-in models: the demo's subjects and the test zoo.

Each is a plain ``nn.Module`` with a ``example_input(batch)`` helper, small
enough to compile and train on a laptop CPU in seconds, and built from the
layers whose saved tensors fxcompress handles: convolutions with batch-norm
and ReLU-family activations, max-pooling, residual blocks, dropout,
embeddings, layer-norm, causal attention and GELU.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["MLP", "ConvNet", "ResidualCNN", "TinyTransformer", "ZOO"]


class MLP(nn.Module):
    """Two hidden layers with ReLU and dropout."""

    def __init__(self, d_in: int = 64, d_hidden: int = 128, n_out: int = 10, p: float = 0.25) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(d_in, d_hidden), nn.Linear(d_hidden, d_hidden), nn.Linear(d_hidden, n_out)
        self.drop = nn.Dropout(p)
        self.d_in = d_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(F.relu(self.fc1(x)))
        x = self.drop(F.relu(self.fc2(x)))
        return self.fc3(x)

    def example_input(self, batch: int = 16) -> torch.Tensor:
        return torch.randn(batch, self.d_in)


class ConvNet(nn.Module):
    """Conv-BN blocks with ReLU, ReLU6 and LeakyReLU, max-pooling, dropout."""

    def __init__(self, channels: int = 16, n_out: int = 10) -> None:
        super().__init__()
        c = channels
        self.features = nn.Sequential(
            nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
            nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU6(),
            nn.MaxPool2d(2),
            nn.Conv2d(c, 2 * c, 3, padding=1), nn.BatchNorm2d(2 * c), nn.LeakyReLU(0.1),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(2 * c * 4 * 4, n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def example_input(self, batch: int = 8) -> torch.Tensor:
        return torch.randn(batch, 3, 16, 16)


class BasicBlock(nn.Module):
    """Post-activation residual block: ``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))``."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
            if stride != 1 or c_in != c_out
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResidualCNN(nn.Module):
    """A small ResNet: stem with max-pool, two stages of two blocks, global pooling."""

    def __init__(self, width: int = 16, n_out: int = 10) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2))
        self.stage1 = nn.Sequential(BasicBlock(w, w), BasicBlock(w, w))
        self.stage2 = nn.Sequential(BasicBlock(w, 2 * w, 2), BasicBlock(2 * w, 2 * w))
        self.fc = nn.Linear(2 * w, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.stage1(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    def example_input(self, batch: int = 8) -> torch.Tensor:
        return torch.randn(batch, 3, 32, 32)


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention and a GELU MLP, with dropout."""

    def __init__(self, d: int, heads: int, p: float) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.drop = nn.Dropout(p)
        self.heads, self.p = heads, p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        p = self.p if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        x = x + self.drop(self.proj(y.transpose(1, 2).reshape(b, t, d)))
        return x + self.drop(self.out(F.gelu(self.fc(self.ln2(x)))))


class TinyTransformer(nn.Module):
    """A character-level GPT: token + position embeddings, blocks, tied-free head."""

    def __init__(self, vocab: int = 96, d: int = 64, heads: int = 4, layers: int = 2, seq: int = 32, p: float = 0.1) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.Sequential(*(Block(d, heads, p) for _ in range(layers)))
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)
        self.drop = nn.Dropout(p)
        self.vocab, self.seq = vocab, seq

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.drop(self.tok(idx) + self.pos(pos))
        return self.head(self.ln(self.blocks(x)))

    def example_input(self, batch: int = 4) -> torch.Tensor:
        return torch.randint(0, self.vocab, (batch, self.seq))


#: name -> factory, the models the tests and the demo run
ZOO = {"mlp": MLP, "convnet": ConvNet, "resnet": ResidualCNN, "transformer": TinyTransformer}
