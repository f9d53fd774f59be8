"""Low-rank factors of gradient matrices: ``G ~ U V^T`` by truncated (randomized) SVD.

A COLD-FD gradient is one matrix per weight; storing rank-`r` factors instead turns a profile of hundreds
of megabytes into a few, and lets the perturbed pass add cheap side paths ``(x V) U^T`` instead of
materializing ``W + eps G``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from steer_core.errors import SteerError

# Extra random directions and power iterations of the randomized SVD (Halko, Martinsson and Tropp 2011):
# enough for the fast-decaying spectra of averaged gradients.
OVERSAMPLE = 8
POWER_ITERATIONS = 2


def max_rank(shape: tuple[int, ...]) -> int:
    return min(shape)


def check_rank(rank: int, shape: tuple[int, ...], name: str, field: str = "params.rank") -> None:
    if rank > max_rank(shape):
        raise SteerError(f"rank {rank} is larger than the matrix {name} ({shape[0]}x{shape[1]}) allows "
                         f"(at most {max_rank(shape)})", field)


def low_rank(matrix: Tensor, rank: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Factors ``(U, V)`` with ``U @ V.T`` the best rank-`rank` approximation of `matrix` (m, n).

    `U` (m, r) carries the singular values, `V` (n, r) is orthonormal. An exact SVD when the rank is a
    large share of the matrix (full rank reproduces it), a seeded randomized SVD otherwise. Runs in fp32.
    """
    if matrix.dim() != 2:
        raise ValueError(f"expected a matrix, got shape {tuple(matrix.shape)}")
    check_rank(rank, tuple(matrix.shape), "of the gradient")
    g = matrix.float()
    m, n = g.shape
    k = min(rank + OVERSAMPLE, m, n)
    if 2 * k >= min(m, n):
        u, s, vh = torch.linalg.svd(g, full_matrices=False)
        return u[:, :rank] * s[:rank], vh[:rank].T.contiguous()
    gen = torch.Generator(device=g.device).manual_seed(seed)
    omega = torch.randn(n, k, generator=gen, device=g.device)
    q, _ = torch.linalg.qr(g @ omega)
    for _ in range(POWER_ITERATIONS):
        z, _ = torch.linalg.qr(g.T @ q)
        q, _ = torch.linalg.qr(g @ z)
    ub, s, vh = torch.linalg.svd(q.T @ g, full_matrices=False)
    return (q @ ub[:, :rank]) * s[:rank], vh[:rank].T.contiguous()
