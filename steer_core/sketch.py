"""Normalized polynomial Count Sketch: a random feature map for the kernel `(gamma <a^, b^> + coef0)^degree`.

`phi(a) = irfft(prod_d rfft(C_d x))` with `a^ = a / |a|`, `x = [sqrt(gamma) a^, sqrt(coef0)]` and `C_d` the
Count Sketch matrix of hash `d` (row `index_hash[d, j]`, sign `bit_hash[d, j]` for input `j`). This is
scikit-learn's `PolynomialCountSketch` applied to `a^`, in torch, batched and in fp32 (FFT needs it).

`vjp` is the analytic vector-Jacobian product `v^T d phi / d a`: each factor's gradient is a circular
cross-correlation of the cotangent with the other factors (one more FFT), gathered back through the
hashes and projected through the normalization. Autograd through `features` gives the same thing; the
analytic form is what steering uses because it needs no graph and precomputes `rfft(v)` once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from steer_core.errors import SteerError
from steer_core.method_params import check_sketch_params  # torch-free: the service checks ODESteer's params by it

_NORM_FLOOR = 1e-12  # |a| below this is treated as this (a zero activation has no direction)


@dataclass(frozen=True, eq=False)
class CountSketch:
    """Seeded hashes and kernel parameters of one polynomial Count Sketch over `dim`-dimensional inputs."""

    index_hash: Tensor  # (degree, dim + 1) int64: output bucket of each lifted input coordinate
    bit_hash: Tensor  # (degree, dim + 1) float32: its sign, +-1
    n_components: int
    gamma: float
    coef0: float
    # The hashes flattened once (set in __post_init__): bucket d * n + index_hash[d, j] of a (degree * n)
    # buffer, and the matching signs.
    _flat_index: Tensor = field(init=False, repr=False)
    _flat_sign: Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        check_sketch_params(self.degree, self.n_components, self.gamma, self.coef0)
        if self.index_hash.shape != self.bit_hash.shape or self.index_hash.ndim != 2:
            raise SteerError("index_hash and bit_hash must both be (degree, dim + 1)", "sketch")
        if int(self.index_hash.min()) < 0 or int(self.index_hash.max()) >= self.n_components:
            raise SteerError(f"index_hash must lie in 0..{self.n_components - 1}", "sketch.index_hash")
        offsets = torch.arange(self.degree, device=self.index_hash.device).unsqueeze(1) * self.n_components
        object.__setattr__(self, "_flat_index", (self.index_hash.long() + offsets).reshape(-1))
        object.__setattr__(self, "_flat_sign", self.bit_hash.float().reshape(-1))

    @classmethod
    def create(cls, dim: int, degree: int = 2, n_components: int = 8000, gamma: float = 0.1,
               coef0: float = 1.0, seed: int = 0) -> CountSketch:
        """Fresh hashes from a seeded generator (the same seed gives the same sketch everywhere)."""
        check_sketch_params(degree, n_components, gamma, coef0)
        gen = torch.Generator().manual_seed(int(seed))
        index = torch.randint(0, n_components, (degree, dim + 1), generator=gen)
        sign = torch.randint(0, 2, (degree, dim + 1), generator=gen).float() * 2.0 - 1.0
        return cls(index_hash=index, bit_hash=sign, n_components=n_components, gamma=float(gamma),
                   coef0=float(coef0))

    @property
    def degree(self) -> int:
        return int(self.index_hash.shape[0])

    @property
    def dim(self) -> int:
        return int(self.index_hash.shape[1]) - 1

    @property
    def device(self) -> torch.device:
        return self.index_hash.device

    def to(self, device: torch.device | str) -> CountSketch:
        if torch.device(device) == self.device:
            return self
        return CountSketch(index_hash=self.index_hash.to(device), bit_hash=self.bit_hash.to(device),
                           n_components=self.n_components, gamma=self.gamma, coef0=self.coef0)

    def same_hashes(self, other: CountSketch) -> bool:
        """Whether two sketches are the same feature map (then linear models on them can be added)."""
        return (self.n_components == other.n_components and self.gamma == other.gamma
                and self.coef0 == other.coef0 and self.index_hash.shape == other.index_hash.shape
                and bool(torch.equal(self.index_hash.cpu(), other.index_hash.cpu()))
                and bool(torch.equal(self.bit_hash.cpu(), other.bit_hash.cpu())))

    def lift(self, unit: Tensor) -> Tensor:
        """`x = [sqrt(gamma) a^, sqrt(coef0)]` for already normalized rows `a^` (B, dim)."""
        self._check_dim(unit)
        ones = unit.new_full((*unit.shape[:-1], 1), self.coef0 ** 0.5)
        return torch.cat([unit * self.gamma ** 0.5, ones], dim=-1)

    def count_sketches(self, x: Tensor) -> Tensor:
        """(B, degree, n): `C_d x` for every hash `d` in one scatter."""
        batch = x.shape[0]
        src = (x.unsqueeze(1) * self._flat_sign.view(self.degree, -1)).reshape(batch, -1)
        out = x.new_zeros(batch, self.degree * self.n_components)
        return out.index_add(1, self._flat_index, src).view(batch, self.degree, self.n_components)

    def features(self, a: Tensor, normalize: bool = True) -> Tensor:
        """`phi(a)` (B, n_components) in fp32; differentiable. `normalize=False` sketches `a` as given."""
        a = unit_and_norm(a)[0] if normalize else a.float()
        spectra = torch.fft.rfft(self.count_sketches(self.lift(a)), dim=-1)
        product = spectra[:, 0]
        for d in range(1, self.degree):
            product = product * spectra[:, d]
        return torch.fft.irfft(product, n=self.n_components, dim=-1)

    def vjp(self, a: Tensor, cotangent: Tensor) -> Tensor:
        """`cotangent^T d phi(a) / d a` (B, dim) for cotangent (n,) or (B, n), analytically."""
        return self.vjp_spectrum(a, torch.fft.rfft(cotangent.float(), dim=-1))

    def vjp_spectrum(self, a: Tensor, cotangent_spectrum: Tensor) -> Tensor:
        """`vjp` with `rfft(cotangent)` given (a fixed cotangent is transformed once, not per call)."""
        unit, norm = unit_and_norm(a)
        return through_normalization(unit, norm, self.unit_vjp_spectrum(unit, cotangent_spectrum))

    def unit_vjp_spectrum(self, unit: Tensor, cotangent_spectrum: Tensor) -> Tensor:
        """Gradient with respect to the normalized input `a^` (B, dim), before the normalization."""
        return self.gamma ** 0.5 * self._lifted_vjp(self.lift(unit), cotangent_spectrum)[:, :-1]

    def _lifted_vjp(self, x: Tensor, cotangent_spectrum: Tensor) -> Tensor:
        """Gradient with respect to the lifted input `x` (B, dim + 1)."""
        spectra = torch.fft.rfft(self.count_sketches(x), dim=-1)  # (B, p, m)
        # phi is the circular convolution of the p sketches, so d<v, phi>/d s_d is the circular
        # cross-correlation of v with the convolution of the others: irfft(V * conj(prod_{e != d} S_e)).
        others = _leave_one_out_products(spectra)
        cot = cotangent_spectrum.unsqueeze(-2) if cotangent_spectrum.ndim == 2 else cotangent_spectrum
        grads = torch.fft.irfft(cot * others.conj(), n=self.n_components, dim=-1)  # (B, p, n)
        picked = grads.reshape(x.shape[0], -1)[:, self._flat_index] * self._flat_sign
        return picked.view(x.shape[0], self.degree, -1).sum(dim=1)

    def tensors(self) -> dict[str, Tensor]:
        """The hashes for a profile (compact dtypes; `from_tensors` restores them)."""
        return {"index_hash": self.index_hash.to(torch.int32).cpu(), "bit_hash": self.bit_hash.to(torch.int8).cpu()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], n_components: int, gamma: float, coef0: float,
                     device: torch.device | str = "cpu") -> CountSketch:
        return cls(index_hash=tensors["index_hash"].long().to(device),
                   bit_hash=tensors["bit_hash"].float().to(device),
                   n_components=int(n_components), gamma=float(gamma), coef0=float(coef0))

    def _check_dim(self, x: Tensor) -> None:
        if x.shape[-1] != self.dim:
            raise SteerError(f"activations have {x.shape[-1]} features, the sketch was made for {self.dim}",
                             "hidden_size")


def unit_and_norm(a: Tensor) -> tuple[Tensor, Tensor]:
    """`(a / |a|, |a|)` in fp32, with |a| floored so a zero row gives a zero direction, not NaN."""
    a = a.float()
    norm = a.norm(dim=-1, keepdim=True).clamp_min(_NORM_FLOOR)
    return a / norm, norm


def through_normalization(unit: Tensor, norm: Tensor, grad_unit: Tensor) -> Tensor:
    """Chain rule through `a^ = a / |a|`: drop the radial part of `d/da^`, divide by `|a|`."""
    return (grad_unit - unit * (unit * grad_unit).sum(dim=-1, keepdim=True)) / norm


def _leave_one_out_products(spectra: Tensor) -> Tensor:
    """(B, p, m) -> (B, p, m): for each d the product of every other factor (no division, zeros are fine)."""
    p = spectra.shape[1]
    ones = torch.ones_like(spectra[:, 0])
    prefix = [ones]
    for d in range(1, p):
        prefix.append(prefix[-1] * spectra[:, d - 1])
    suffix = ones
    out = [ones] * p
    for d in range(p - 1, -1, -1):
        out[d] = prefix[d] * suffix
        suffix = suffix * spectra[:, d]
    return torch.stack(out, dim=1)
