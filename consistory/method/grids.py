"""The token grids of SDXL's self-attention layers, derived from the actual latent size."""

from __future__ import annotations

from dataclasses import dataclass


def _half(n: int) -> int:
    # SDXL downsamples with stride-2 convolutions (padding 1): ceil(n / 2).
    return (n + 1) // 2


@dataclass(frozen=True)
class Grids:
    """Latent grid h x w, the fine grid (h/2 x w/2) and the coarse grid (h/4 x w/4)."""

    latent: tuple[int, int]

    @classmethod
    def for_image(cls, height: int, width: int, vae_scale_factor: int = 8) -> "Grids":
        return cls((height // vae_scale_factor, width // vae_scale_factor))

    @property
    def fine(self) -> tuple[int, int]:
        return (_half(self.latent[0]), _half(self.latent[1]))

    @property
    def coarse(self) -> tuple[int, int]:
        return (_half(self.fine[0]), _half(self.fine[1]))

    def shape(self, name: str) -> tuple[int, int]:
        return {"fine": self.fine, "coarse": self.coarse}[name]

    def tokens(self, name: str) -> int:
        h, w = self.shape(name)
        return h * w

    def name_of(self, n_tokens: int) -> str | None:
        """Which grid a layer works on, from its token count; None for other resolutions."""
        if n_tokens == self.tokens("fine"):
            return "fine"
        if n_tokens == self.tokens("coarse"):
            return "coarse"
        return None
