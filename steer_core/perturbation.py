"""A direction in ``theta_<=L`` (the token embeddings and blocks ``0..L``), stored compactly.

COLD-FD's gradient ``g`` lives in this space. Its embedding part is exactly row-sparse (only the tokens a
sample uses); each weight matrix of a Linear is kept as a `SidePath` (rank-`r` factors ``U V^T``, or the
dense matrix before compression, plus the bias) so the perturbed pass can add ``t * side(x)`` to the
Linear's output instead of materializing ``W + t G``; every other parameter (norm gains) stays dense.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from steer_core.cold import SampleGradients, block_of, block_parameters, embedding_scale
from steer_core.lowrank import low_rank
from steer_core.models import LanguageModel


@dataclass
class SidePath:
    """The perturbation of one Linear (or GPT-2 Conv1D) module in Linear orientation (out, in):
    ``U V^T`` and/or a dense matrix, plus a bias. ``side(x) = (x V) U^T + x dense^T + bias``."""

    U: Tensor | None = None  # (out, r)
    V: Tensor | None = None  # (in, r)
    dense: Tensor | None = None  # (out, in)
    bias: Tensor | None = None  # (out,)

    def __call__(self, x: Tensor) -> Tensor:
        out: Tensor | int = 0
        if self.U is not None and self.V is not None:
            out = (x @ self.V) @ self.U.T
        if self.dense is not None:
            out = out + x @ self.dense.T
        if self.bias is not None:
            out = out + self.bias
        return out  # type: ignore[return-value]

    def map(self, fn: Callable[[Tensor], Tensor]) -> SidePath:
        return SidePath(*(None if t is None else fn(t) for t in (self.U, self.V, self.dense, self.bias)))

    def tensors(self) -> dict[str, Tensor]:
        named = {"U": self.U, "V": self.V, "dense": self.dense, "bias": self.bias}
        return {k: v for k, v in named.items() if v is not None}


@dataclass
class Perturbation:
    """A direction in ``theta_<=L``: row-sparse embedding rows, one `SidePath` per Linear, dense others.

    Paths are module (`sides`) or parameter (`params`) paths in the model. `embedding_scale` turns an
    embedding weight row into what block 0 receives (1 except for scaled embeddings).
    """

    embedding_index: Tensor  # (R,) token ids, sorted
    embedding_rows: Tensor  # (R, D)
    sides: dict[str, SidePath] = field(default_factory=dict)
    params: dict[str, Tensor] = field(default_factory=dict)
    embedding_scale: float = 1.0

    @classmethod
    def descent(cls, lm: LanguageModel, grads: SampleGradients) -> Perturbation:
        """``-g`` from a sample's gradients, with each matrix gradient in Linear orientation."""
        modules = dict(lm.model.named_modules())
        sides: dict[str, SidePath] = {}
        params: dict[str, Tensor] = {}
        for path, g in grads.param_grads.items():
            owner, name = path.rsplit(".", 1)
            module = modules[owner]
            if isinstance(module, nn.Linear | Conv1D) and name in ("weight", "bias"):
                side = sides.setdefault(owner, SidePath())
                if name == "bias":
                    side.bias = -g
                else:
                    side.dense = -(g.T if isinstance(module, Conv1D) else g)
            else:
                params[path] = -g
        return cls(embedding_index=grads.embedding_index, embedding_rows=-grads.embedding_grads, sides=sides,
                   params=params, embedding_scale=embedding_scale(lm))

    def restrict(self, lm: LanguageModel, upto: int) -> Perturbation:
        """Only the parts in blocks ``0..upto`` (and the embedding rows)."""
        return Perturbation(self.embedding_index, self.embedding_rows,
                            {p: s for p, s in self.sides.items() if within_blocks(lm, p, upto)},
                            {p: t for p, t in self.params.items() if within_blocks(lm, p, upto)},
                            self.embedding_scale)

    def compress(self, rank: int | None, seed: int = 0) -> Perturbation:
        """Every dense matrix as rank-`rank` factors (None: unchanged)."""
        if rank is None:
            return self
        sides = {}
        for i, (path, side) in enumerate(self.sides.items()):
            if side.dense is None:
                sides[path] = side
                continue
            u, v = low_rank(side.dense, rank, seed=seed + i)
            sides[path] = SidePath(U=u, V=v, bias=side.bias)
        return Perturbation(self.embedding_index, self.embedding_rows, sides, dict(self.params),
                            self.embedding_scale)

    def map(self, fn: Callable[[Tensor], Tensor]) -> Perturbation:
        rows = fn(self.embedding_rows)
        return Perturbation(self.embedding_index.to(rows.device), rows, {p: s.map(fn) for p, s in self.sides.items()},
                            {p: fn(t) for p, t in self.params.items()}, self.embedding_scale)

    def scaled(self, c: float) -> Perturbation:
        """``c`` times this direction (only `U` of each factor pair is scaled)."""
        sides = {p: SidePath(U=None if s.U is None else c * s.U, V=s.V,
                             dense=None if s.dense is None else c * s.dense,
                             bias=None if s.bias is None else c * s.bias) for p, s in self.sides.items()}
        return Perturbation(self.embedding_index, c * self.embedding_rows, sides,
                            {p: c * t for p, t in self.params.items()}, self.embedding_scale)

    @classmethod
    def combine(cls, weighted: Sequence[tuple[Perturbation, float]]) -> Perturbation:
        """``sum_k w_k P_k``: factors concatenated (rank adds up), everything else added."""
        parts = [p.scaled(w) for p, w in weighted]
        first = parts[0]
        index = torch.cat([p.embedding_index for p in parts])
        rows = torch.cat([p.embedding_rows.to(first.embedding_rows) for p in parts])
        unique, inverse = torch.unique(index, return_inverse=True)
        summed = torch.zeros(len(unique), rows.shape[1], dtype=rows.dtype, device=rows.device)
        summed.index_add_(0, inverse.to(rows.device), rows)
        sides: dict[str, SidePath] = {}
        for p in parts:
            for path, s in p.sides.items():
                acc = sides.setdefault(path, SidePath())
                if s.U is not None and s.V is not None:
                    acc.U = s.U if acc.U is None else torch.cat([acc.U, s.U], dim=1)
                    acc.V = s.V if acc.V is None else torch.cat([acc.V, s.V], dim=1)
                for name in ("dense", "bias"):
                    t = getattr(s, name)
                    if t is not None:
                        prev = getattr(acc, name)
                        setattr(acc, name, t if prev is None else prev + t)
        params: dict[str, Tensor] = {}
        for p in parts:
            for path, t in p.params.items():
                params[path] = t if path not in params else params[path] + t
        return cls(unique.to(first.embedding_index.device), summed, sides, params, first.embedding_scale)

    def to_tensors(self, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
        """Flat named tensors for a profile: matrices and rows in `dtype`, vectors in fp32."""
        out = {"embedding:index": self.embedding_index.to(torch.int64).contiguous(),
               "embedding:rows": self.embedding_rows.to(dtype).contiguous()}
        for path, side in self.sides.items():
            for name, t in side.tensors().items():
                out[f"side:{path}:{name}"] = t.to(torch.float32 if name == "bias" else dtype).contiguous()
        for path, t in self.params.items():
            out[f"param:{path}"] = t.to(torch.float32 if t.dim() < 2 else dtype).contiguous()
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], embedding_scale: float = 1.0) -> Perturbation:
        sides: dict[str, SidePath] = {}
        params: dict[str, Tensor] = {}
        for key, t in tensors.items():
            kind, _, rest = key.partition(":")
            if kind == "side":
                path, _, name = rest.rpartition(":")
                setattr(sides.setdefault(path, SidePath()), name, t.float())
            elif kind == "param":
                params[rest] = t.float()
        index, rows = tensors["embedding:index"].long(), tensors["embedding:rows"].float()
        if len(index) > 1 and not bool((index[1:] > index[:-1]).all()):  # lookups need sorted, unique ids
            index, inverse = torch.unique(index, return_inverse=True)
            rows = torch.zeros(len(index), rows.shape[1]).index_add_(0, inverse, rows)
        return cls(index, rows, sides, params, embedding_scale)


def within_blocks(lm: LanguageModel, path: str, upto: int) -> bool:
    """Whether a module or parameter path lies in blocks ``0..upto``."""
    block = block_of(lm, path)
    return block is not None and block <= upto


def nbytes(tensors: dict[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def uncompressed_bytes(lm: LanguageModel, upto: int) -> int:
    """Size of a full fp32 gradient over ``theta_<=upto`` (the whole embedding matrix included)."""
    emb = lm.embedding_weight
    return 4 * (emb.numel() + sum(p.numel() for p in block_parameters(lm, upto).values()))
