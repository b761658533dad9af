"""Every constant of the published method in one typed, frozen config (docs/method.md section 10)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from .errors import InputError


@dataclass(frozen=True)
class ConsiStoryConfig:
    """Knobs of ConsiStory. Defaults are those of Tewel et al. 2024 on SDXL base 1.0."""

    # --- mechanism switches (turning all four off gives plain SDXL) ---
    sdsa: bool = True  # subject-driven shared self-attention in `up` layers
    query_mixing: bool = True  # vanilla query mixing for layout diversity
    feature_injection: bool = True  # DIFT-guided feature injection (adds the second pass)
    freeu: bool = True

    # --- sampling ---
    num_inference_steps: int = 50
    guidance_scale: float = 5.0
    height: int = 1024
    width: int = 1024
    n_anchors: int = 2

    # --- subject localization (section 2) ---
    mask_dropout: float = 0.5
    mask_window: int = 20  # cross-attention records kept per layer
    otsu_bins: int = 256

    # --- vanilla query mixing (section 4): strengths linspace(start, end, S//10 + 1) ---
    query_mix_start: float = 0.9
    query_mix_end: float = 0.81836735
    # Query mixing covers steps 0..S // query_mix_divisor (the mixed forwards run at 1..S//10).
    query_mix_divisor: int = 10

    # --- DIFT features (section 5) ---
    dift_timestep: int = 261  # step 36 of 50 with SDXL's leading DDIM spacing
    dift_sigma: float = 1.0
    dift_kernel_size: int = 3
    # As published: with FreeU on, the features carry FreeU's backbone scaling. The published
    # code keeps `up_blocks[0]`'s output as a view that FreeU then scales in place (its first
    # C/2 channels times b2) when `up_blocks[1]` starts, so correspondence sees those channels
    # scaled. False uses the plain block output.
    dift_freeu_scaling: bool = True

    # --- feature injection (section 7): steps S//10 .. S//3 ---
    injection_alpha: float = 0.8
    injection_start_divisor: int = 10
    injection_end_divisor: int = 3

    # --- FreeU (s1, s2, b1, b2) ---
    freeu_s1: float = 0.6
    freeu_s2: float = 0.4
    freeu_b1: float = 1.1
    freeu_b2: float = 1.2

    def __post_init__(self) -> None:
        problems = self._type_problems()
        if problems:
            raise InputError("invalid ConsiStoryConfig: " + "; ".join(problems))
        if self.num_inference_steps < 1:
            problems.append(f"num_inference_steps must be >= 1 (got {self.num_inference_steps})")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value < 32 or value % 8:
                problems.append(f"{name} must be a multiple of 8 and at least 32 (got {value})")
        if self.n_anchors < 1:
            problems.append(f"n_anchors must be >= 1 (got {self.n_anchors})")
        if not 0.0 <= self.mask_dropout <= 1.0:
            problems.append(f"mask_dropout must be in [0, 1] (got {self.mask_dropout})")
        if self.mask_window < 1:
            problems.append(f"mask_window must be >= 1 (got {self.mask_window})")
        if not 0.0 <= self.injection_alpha <= 1.0:
            problems.append(f"injection_alpha must be in [0, 1] (got {self.injection_alpha})")
        if self.guidance_scale < 0:
            problems.append(f"guidance_scale must be >= 0 (got {self.guidance_scale})")
        for name in ("query_mix_divisor", "injection_start_divisor", "injection_end_divisor"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.dift_kernel_size < 1 or self.dift_kernel_size % 2 == 0:
            problems.append(f"dift_kernel_size must be odd and positive (got {self.dift_kernel_size})")
        if self.dift_sigma <= 0:
            problems.append(f"dift_sigma must be > 0 (got {self.dift_sigma})")
        if self.otsu_bins < 2:
            problems.append(f"otsu_bins must be >= 2 (got {self.otsu_bins})")
        if problems:
            raise InputError("invalid ConsiStoryConfig: " + "; ".join(problems))

    def _type_problems(self) -> list[str]:
        problems = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            expected = {"bool": bool, "int": int, "float": (int, float)}[f.type]
            if isinstance(value, bool) and f.type != "bool" or not isinstance(value, expected):
                problems.append(f"{f.name} must be of type {f.type} (got {value!r})")
        return problems

    # --- schedules derived from the step count ---
    @property
    def query_mix_last_step(self) -> int:
        return self.num_inference_steps // self.query_mix_divisor

    def query_mix_strength(self, step: int) -> float | None:
        """Strength s_i of the vanilla query at `step`, or None where no mixing happens.

        Mixing acts on the SDSA forward, which exists from step 1 on; at step 0 both forwards
        would be identical, so no extra forward is spent there.
        """
        last = self.query_mix_last_step
        if not self.query_mixing or step < 1 or step > last:
            return None
        return self.query_mix_start + (self.query_mix_end - self.query_mix_start) * step / last

    def injection_steps(self) -> range:
        s = self.num_inference_steps
        return range(s // self.injection_start_divisor, s // self.injection_end_divisor + 1)

    @property
    def two_passes(self) -> bool:
        return self.feature_injection

    def replace(self, **changes: Any) -> "ConsiStoryConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ConsiStoryConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown ConsiStoryConfig fields: {', '.join(unknown)}")
        return cls(**values)


def vanilla_config(**changes: Any) -> ConsiStoryConfig:
    """All mechanisms off: the result is plain SDXL for the same latents."""
    return ConsiStoryConfig(sdsa=False, query_mixing=False, feature_injection=False, freeu=False).replace(**changes)

