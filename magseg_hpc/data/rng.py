"""One interface over ``torch.Generator`` and ``numpy.random.Generator``.

Augmentation and mixing draw only from the generator they are given (never the global RNG),
so resume and DDP decide every random number by saving and seeding that generator.
"""

from __future__ import annotations

import math

import numpy as np
import torch


class Rng:
    """Scalar draws plus tensor noise from a torch or numpy generator."""

    def __init__(self, generator: torch.Generator | np.random.Generator):
        if isinstance(generator, Rng):
            generator = generator.generator
        if not isinstance(generator, torch.Generator | np.random.Generator):
            raise TypeError(
                "pass a torch.Generator or numpy.random.Generator, got "
                f"{type(generator).__name__} (the global RNG is not used on purpose)"
            )
        self.generator = generator
        self.is_torch = isinstance(generator, torch.Generator)

    def random(self) -> float:
        """U[0, 1)."""
        if self.is_torch:
            return float(torch.rand((), generator=self.generator, dtype=torch.float64))
        return float(self.generator.random())

    def uniform(self, low: float, high: float) -> float:
        return low + (high - low) * self.random()

    def integers(self, low: int, high: int, size: int | None = None):
        """Integers in [low, high) (high exclusive, like numpy)."""
        if self.is_torch:
            t = torch.randint(low, high, (1 if size is None else size,), generator=self.generator)
            return int(t[0]) if size is None else t.numpy()
        return (
            int(self.generator.integers(low, high))
            if size is None
            else self.generator.integers(low, high, size=size)
        )

    def permutation(self, n: int) -> np.ndarray:
        if self.is_torch:
            return torch.randperm(n, generator=self.generator).numpy()
        return self.generator.permutation(n)

    def normal(self, shape) -> torch.Tensor:
        """Standard normal float32 tensor on the CPU."""
        if self.is_torch:
            return torch.randn(shape, generator=self.generator)
        return torch.from_numpy(self.generator.standard_normal(shape, dtype=np.float32))

    def gamma(self, shape_k: float) -> float:
        if not self.is_torch:
            return float(self.generator.gamma(shape_k))
        # Marsaglia-Tsang (torch's samplers take no generator)
        boost = 1.0
        if shape_k < 1.0:
            boost = self.random() ** (1.0 / shape_k)
            shape_k += 1.0
        d = shape_k - 1.0 / 3.0
        c = 1.0 / math.sqrt(9.0 * d)
        while True:
            x = float(torch.randn((), generator=self.generator, dtype=torch.float64))
            v = (1.0 + c * x) ** 3
            if v <= 0:
                continue
            u = self.random()
            if u > 0 and math.log(u) < 0.5 * x * x + d - d * v + d * math.log(v):
                return d * v * boost

    def beta(self, a: float, b: float) -> float:
        if not self.is_torch:
            return float(self.generator.beta(a, b))
        x, y = self.gamma(a), self.gamma(b)
        return x / (x + y)
