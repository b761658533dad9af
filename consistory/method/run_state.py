"""The per-generation state that the attention processors and hooks share.

diffusers hands a processor only the keyword arguments its `__call__` names, so per-step facts
(which pass, which step, which masks) live here, in one object the processors were built with.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..config import ConsiStoryConfig
from .anchors import AnchorSource, LayerStep
from .correspondence import InjectionPlan, nearest_sources, plan_injection, tokens_at_grid
from .grids import Grids
from .host_transfers import to_device
from .subject_masks import CrossAttentionWindow, MaskDropout, masks_from_maps

GRID_ORDER = ("coarse", "fine")


@dataclass
class PassSnapshot:
    """Where pass 1 stood just before step `step`: everything pass 2 needs to resume there.

    Pass 2 repeats pass 1 exactly until injection starts at step S // 10 (same latents, masks,
    dropout draws and query mixing), so it starts from this snapshot instead of from step 0:
    those steps are computed once, and an anchor cache stores them once.
    """

    step: int
    latents: torch.Tensor  # the input of step `step`
    scheduler: Any  # a copy, with whatever state the scheduler keeps between steps
    window: dict[str, list[torch.Tensor]]  # the cross-attention records so far


@dataclass
class RunState:
    config: ConsiStoryConfig
    grids: Grids
    n_images: int
    token_weights: torch.Tensor  # (B, S, T)
    present: torch.Tensor  # (B, S) bool
    anchors: AnchorSource
    seeds: list[int]
    dift_step: int

    pass_index: int = 1
    step: int = 0
    fused_vanilla: bool = False  # this forward carries the vanilla rows first (query mixing)
    mix_strength: float | None = None
    sdsa_active: bool = False
    inject_active: bool = False
    capture_dift: bool = False
    dropout_masks: dict[str, torch.Tensor] = field(default_factory=dict)
    final_masks: dict[str, torch.Tensor] = field(default_factory=dict)  # pass 1, after its last step
    dift: torch.Tensor | None = None  # (B, C, H, W) smoothed
    plan: InjectionPlan | None = None
    window: CrossAttentionWindow = field(init=False)
    keep: dict[str, torch.Tensor] = field(init=False)  # {grid: (S, B, N) bool}: what step i's dropout keeps

    def __post_init__(self) -> None:
        self.window = CrossAttentionWindow(self.config.mask_window)
        self.keep = {}
        if self.config.sdsa and self.anchors.uses_dropout:
            # Every draw of the generation, made on the host before the loop starts. Step 0 has
            # no SDSA and draws nothing (its row keeps nothing); step i >= 1 makes the i-th draw.
            # Both passes use the same draws: pass 2 run from step 0 repeats pass 1 until
            # injection starts, which is what makes resuming it exact.
            tokens = {name: self.grids.tokens(name) for name in GRID_ORDER}
            draws = MaskDropout(self.seeds, self.config.mask_dropout).keep(self.config.num_inference_steps - 1, tokens)
            keep = {name: F.pad(k, (0, 0, 0, 0, 1, 0), value=False) for name, k in draws.items()}
            device = self.token_weights.device
            self.anchors.prepare(keep, device)
            self.keep = {name: to_device(k, device) for name, k in keep.items()}

    # --- rows of the UNet batch: [vanilla uncond, vanilla cond]? + [uncond, cond] ---
    @property
    def main_offset(self) -> int:
        return 2 * self.n_images if self.fused_vanilla else 0

    def half_rows(self, half: int) -> slice:
        start = self.main_offset + half * self.n_images
        return slice(start, start + self.n_images)

    def at(self, layer: str, grid: str) -> LayerStep:
        return LayerStep(self.pass_index, self.step, layer, grid)

    # --- schedule ---
    def begin_pass(self, pass_index: int, resume: PassSnapshot | None = None) -> None:
        """Start a pass from step 0, or (pass 2) from a snapshot of pass 1."""
        self.pass_index = pass_index
        self.window.reset()
        if resume is not None:
            self.window.restore(resume.window)

    def snapshot(self, step: int, latents: torch.Tensor, scheduler) -> PassSnapshot:
        """Called before `begin_step(step)`."""
        return PassSnapshot(step=step, latents=latents, scheduler=copy.deepcopy(scheduler), window=self.window.snapshot())

    def begin_step(self, step: int) -> None:
        cfg = self.config
        self.step = step
        self.mix_strength = cfg.query_mix_strength(step)
        self.fused_vanilla = self.mix_strength is not None
        self.sdsa_active = cfg.sdsa and step >= 1
        self.inject_active = self.pass_index == 2 and cfg.feature_injection and step in cfg.injection_steps()
        self.capture_dift = self.pass_index == 1 and cfg.feature_injection and step == self.dift_step
        if self.sdsa_active and self.keep:
            # Masks at step i come from the cross-attention aggregate through step i - 1.
            masks = self.current_masks()
            self.dropout_masks = {name: masks[name] & self.keep[name][step] for name in GRID_ORDER}

    def current_masks(self) -> dict[str, torch.Tensor]:
        maps = self.window.aggregate()
        return masks_from_maps(maps, self.present, self.grids, self.config.otsu_bins, GRID_ORDER)

    def end_pass(self) -> None:
        if self.pass_index == 1:
            self.final_masks = self.current_masks()
        self.anchors.end_pass(self.pass_index, self.final_masks, self.dift)
        if self.pass_index == 1 and self.config.feature_injection:
            self.plan = self._injection_plan()

    def _injection_plan(self) -> InjectionPlan:
        if self.dift is None:
            raise RuntimeError("DIFT features were not captured in pass 1; the up block hook did not run")
        source_dift, source_masks, own_index = self.anchors.correspondence_sources(self.dift, self.final_masks["fine"])
        shape = self.grids.fine
        targets = tokens_at_grid(self.dift, shape)
        sources = tokens_at_grid(source_dift, shape)
        nn_dist, nn_map = nearest_sources(targets, sources, source_masks, own_index)
        return plan_injection(nn_dist, nn_map, self.final_masks["fine"], source_masks, self.config.otsu_bins)
