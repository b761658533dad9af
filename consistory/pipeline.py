"""ConsiStoryPipeline: the method on a stock diffusers StableDiffusionXLPipeline."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch

from .anchor_cache import AnchorCache
from .anchors import CachedAnchors, LiveAnchors
from .cache_codecs import CODECS
from .config import ConsiStoryConfig
from .control import check_controlnet
from .denoise import decode_latents, denoise_pass, dift_hook, encode_conditioning, nearest_step
from .errors import InputError
from .fingerprint import unet_fingerprint
from .grids import Grids
from .image_inputs import ImageInputs
from .outputs import AnchorsOutput, StoryOutput
from .processors import build_processors
from .progress import ProgressCallback, step_progress
from .run_state import RunState
from .seeds import check_seeds, consecutive_seeds, initial_latents
from .subject_tokens import find_subject_tokens

FREEU_KEYS = ("s1", "s2", "b1", "b2")


class ConsiStoryPipeline:
    """Consistent subjects across images, training-free, on SDXL.

    The wrapped pipeline is left as it was: the method's attention processors, FreeU and the DIFT
    hook are installed only while generating and removed afterwards, even on error.
    """

    def __init__(self, sdxl, model_id: str | None = None, controlnet=None) -> None:
        self.sdxl = sdxl
        # A StableDiffusionXLControlNetPipeline brings its own ControlNet.
        self.controlnet = controlnet if controlnet is not None else getattr(sdxl, "controlnet", None)
        check_controlnet(self.controlnet)
        self.model_id = model_id or getattr(sdxl, "name_or_path", None) or sdxl.__class__.__name__
        self.progress_bar = True
        # Pass 2 starts from pass 1's state at step S // 10 (exact); False runs it from step 0,
        # which gives the same images at the cost of the repeated steps (kept for checking that).
        self.resume_pass2 = True
        self._fingerprint: str | None = None
        # Generation swaps the UNet's processors: one generation at a time per pipeline.
        self._lock = threading.Lock()

    # --- construction ---
    @classmethod
    def from_pretrained(cls, model_id_or_path: str, controlnet=None, **diffusers_kwargs: Any) -> "ConsiStoryPipeline":
        """Load SDXL weights (hub id or local directory) and use DDIM as the method specifies;
        `controlnet`: an SDXL `ControlNetModel` (hub or directory) for `control_images`."""
        from diffusers import DDIMScheduler, StableDiffusionXLPipeline

        sdxl = StableDiffusionXLPipeline.from_pretrained(model_id_or_path, **diffusers_kwargs)
        sdxl.scheduler = DDIMScheduler.from_config(sdxl.scheduler.config)
        if controlnet is not None:
            controlnet = controlnet.to(device=sdxl.unet.device, dtype=sdxl.unet.dtype)
        return cls(sdxl, model_id=str(model_id_or_path), controlnet=controlnet)

    @classmethod
    def from_sdxl(cls, pipe, model_id: str | None = None, controlnet=None) -> "ConsiStoryPipeline":
        """Wrap an existing StableDiffusionXLPipeline or StableDiffusionXLControlNetPipeline (its
        scheduler is used as it is)."""
        return cls(pipe, model_id=model_id, controlnet=controlnet)

    @classmethod
    def from_preset(cls, name: str, seed: int = 0, **kwargs: Any) -> "ConsiStoryPipeline":
        """Random-weight SDXL-topology presets ("tiny", "small", "full"); see consistory.presets."""
        from .presets import build_preset_sdxl

        return cls(build_preset_sdxl(name, seed=seed, **kwargs), model_id=f"preset:{name}:{seed}")

    @property
    def device(self) -> torch.device:
        return self.sdxl.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.sdxl.unet.dtype

    def to(self, *args, **kwargs) -> "ConsiStoryPipeline":
        self.sdxl.to(*args, **kwargs)
        if self.controlnet is not None and getattr(self.sdxl, "controlnet", None) is not self.controlnet:
            self.controlnet.to(*args, **kwargs)
        self._fingerprint = None
        return self

    def set_progress_bar_config(self, disable: bool = False) -> None:
        self.progress_bar = not disable

    @property
    def model_fingerprint(self) -> str:
        """Identifies the UNet (architecture and a sample of its weights) for cache checks.

        Independent of the process (diffusers' private config keys are left out: some are
        built from sets) and of the dtype the weights are held in (they are hashed in fp16).
        """
        if self._fingerprint is None:
            self._fingerprint = unet_fingerprint(self.sdxl)
        return self._fingerprint

    def default_config(self) -> ConsiStoryConfig:
        return ConsiStoryConfig()

    # --- the three entry points ---
    def generate_story(
        self,
        prompts: Sequence[str],
        subjects: Sequence[str],
        seed: int = 0,
        config: ConsiStoryConfig | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        progress: ProgressCallback | None = None,
        images: Sequence[Any] | None = None,
        control_images: Sequence[Any] | None = None,
        controlnet_conditioning_scale: float = 1.0,
        control_guidance: tuple[float, float] = (0.0, 1.0),
    ) -> StoryOutput:
        """All prompts in one batch; the first `config.n_anchors` images are the anchors.

        Fewer prompts than anchors is refused (InputError) while SDSA or feature injection is on;
        with both off no image looks at the anchors, so their number does not matter.

        `images`: one entry per anchor, a PIL photo of the subject the anchor prompt describes or
        None (a generated anchor); see `create_anchors`. `control_images`: one entry per prompt,
        a PIL control image for the pipeline's ControlNet or None; `controlnet_conditioning_scale`
        and `control_guidance` (start, end) as diffusers' ControlNet pipeline has them."""
        config = config or self.default_config()
        prompts, subjects = text_list(prompts, "prompts"), text_list(subjects, "subjects")
        uses_anchors = config.sdsa or config.feature_injection
        if uses_anchors and config.n_anchors > len(prompts):
            raise InputError(
                f"n_anchors is {config.n_anchors} but only {len(prompts)} prompt(s) were given; the first "
                "n_anchors prompts are the anchors, so give at least that many prompts or lower n_anchors"
            )
        seeds = consecutive_seeds(seed, len(prompts))
        n_anchors = min(config.n_anchors, len(prompts))
        inputs = ImageInputs.checked(len(prompts), n_anchors, images, control_images, controlnet_conditioning_scale,
                                     control_guidance)
        anchors = LiveAnchors(n_anchors, len(prompts))
        return self._generate(prompts, subjects, seeds, config, latents, anchors, output_type, progress, inputs)

    def create_anchors(
        self,
        anchor_prompts: Sequence[str],
        subjects: Sequence[str],
        seed: int = 0,
        config: ConsiStoryConfig | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        cache_device: str | torch.device | None = None,
        cache_codec: str = "exact",
        progress: ProgressCallback | None = None,
        images: Sequence[Any] | None = None,
        control_images: Sequence[Any] | None = None,
        controlnet_conditioning_scale: float = 1.0,
        control_guidance: tuple[float, float] = (0.0, 1.0),
    ) -> AnchorsOutput:
        """Generate the anchor images and record the anchor cache (on `cache_device` if given,
        e.g. "cpu" to keep it off the GPU). Every prompt is an anchor: the cache's config has
        `n_anchors = len(anchor_prompts)`.

        `images`: one entry per anchor prompt, a PIL photo of the subject that prompt describes
        (inverted with edit-friendly DDPM inversion; the anchor regenerates the photo and new
        images attend to it) or None (an anchor generated from its prompt). `control_images`,
        `controlnet_conditioning_scale`, `control_guidance`: as in `generate_story`.

        `cache_codec`: "exact" (every tensor as computed) or "compact" (8 bits or fewer per
        value, about 1/6 of exact's bytes; new images deviate from exact ones by a few percent
        of the method's own effect, see README "Compact anchor caches")."""
        config = config or self.default_config()
        prompts, subjects = text_list(anchor_prompts, "anchor_prompts"), text_list(subjects, "subjects")
        if len(prompts) != config.n_anchors:
            config = config.replace(n_anchors=len(prompts))
        seeds = consecutive_seeds(seed, len(prompts))
        cache = AnchorCache(
            subjects=list(subjects),
            anchor_prompts=prompts,
            seeds=seeds,
            config=config,
            model_id=self.model_id,
            model_fingerprint=self.model_fingerprint,
            dtype=str(self.dtype).removeprefix("torch."),
            codec=check_codec(cache_codec),
            storage_device=str(cache_device) if cache_device is not None else None,
        )
        inputs = ImageInputs.checked(len(prompts), len(prompts), images, control_images, controlnet_conditioning_scale,
                                     control_guidance)
        anchors = LiveAnchors(len(prompts), len(prompts), recorder=cache)
        out = self._generate(prompts, subjects, seeds, config, latents, anchors, output_type, progress, inputs)
        cache.finish_recording()
        return AnchorsOutput(out.images, out.seeds, out.subject_masks, out.timings, cache=cache)

    def generate_from_anchors(
        self,
        cache: AnchorCache,
        prompts: Sequence[str],
        seeds: Sequence[int] | None = None,
        config: ConsiStoryConfig | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        progress: ProgressCallback | None = None,
        control_images: Sequence[Any] | None = None,
        controlnet_conditioning_scale: float = 1.0,
        control_guidance: tuple[float, float] = (0.0, 1.0),
    ) -> StoryOutput:
        """New images of the cached subject; each is independent of the others in the call.

        Default seeds continue the anchors': `cache.seeds[0] + n_anchors + j` for prompt j.
        `control_images` (one per prompt, PIL or None) and the ControlNet settings: as in
        `generate_story`; they may differ from the anchors'.
        """
        config = config or cache.config
        cache.check_compatible(self.model_fingerprint, config)
        cache.check_structure(self.sdxl.unet, self.sdxl.vae_scale_factor)
        prompts = text_list(prompts, "prompts")
        if seeds is None:
            seeds = consecutive_seeds(cache.seeds[0] + cache.n_anchors, len(prompts))
        seeds = check_seeds(list(seeds))
        if len(seeds) != len(prompts):
            raise InputError(f"got {len(seeds)} seeds for {len(prompts)} prompts; give one seed per prompt")
        inputs = ImageInputs.checked(len(prompts), 0, None, control_images, controlnet_conditioning_scale,
                                     control_guidance)
        anchors = CachedAnchors(cache, len(prompts))
        return self._generate(prompts, cache.subjects, seeds, config, latents, anchors, output_type, progress, inputs)

    # --- the shared path ---
    def _generate(self, prompts, subjects, seeds, config, latents, anchors, output_type, progress=None,
                  inputs: ImageInputs | None = None) -> StoryOutput:
        with self._lock:
            return self._generate_locked(prompts, subjects, seeds, config, latents, anchors, output_type, progress,
                                         inputs or ImageInputs())

    def _generate_locked(self, prompts, subjects, seeds, config, latents, anchors, output_type, progress,
                         inputs: ImageInputs) -> StoryOutput:
        if output_type not in ("pil", "np", "pt", "latent"):
            raise InputError(f"output_type must be 'pil', 'np', 'pt' or 'latent' (got {output_type!r})")
        sdxl = self.sdxl
        timings: dict[str, float] = {}
        start = time.perf_counter()
        tokens = find_subject_tokens(sdxl.tokenizer, prompts, subjects)
        grids = Grids.for_image(config.height, config.width, sdxl.vae_scale_factor)
        latents = self._initial_latents(seeds, grids, latents)
        scheduler = type(sdxl.scheduler).from_config(sdxl.scheduler.config)
        scheduler.set_timesteps(config.num_inference_steps, device=self.device)
        latents = latents * scheduler.init_noise_sigma  # 1 for DDIM; not for e.g. Euler
        state = RunState(
            config=config,
            grids=grids,
            n_images=len(prompts),
            token_weights=tokens.weights().to(self.device),
            present=tokens.present.to(self.device),
            anchors=anchors,
            seeds=seeds,
            dift_step=nearest_step(scheduler.timesteps, config.dift_timestep),
        )
        # Pass 2 resumes from pass 1's state where injection starts (see PassSnapshot).
        resume_at = config.injection_steps().start if config.two_passes and self.resume_pass2 else None
        steps = config.num_inference_steps
        with torch.no_grad(), step_progress(self.progress_bar, config, resume_at, state, progress) as step_done:
            cond = encode_conditioning(sdxl, prompts, config.height, config.width, self.device)
            control = inputs.control_signal(self.controlnet, config.height, config.width, sdxl.vae_scale_factor,
                                            self.device)
            timings["encode_s"] = time.perf_counter() - start
            if inputs.photos is not None:
                t0 = time.perf_counter()
                with self._freeu_installed(config):  # the model the rows are sampled with, no mechanism
                    photos = inputs.invert_photos(sdxl, scheduler, cond, seeds, config, control, self.device)
                latents = latents.clone()
                latents[photos.rows] = photos.x_T.to(latents.dtype)
                timings["inversion_s"] = time.perf_counter() - t0
            else:
                photos = None
            rows = {"control": control, "photos": photos}
            with self._method_installed(state, config):
                t0 = time.perf_counter()
                scheduler.set_timesteps(steps, device=self.device)
                state.begin_pass(1)
                result, snapshot = denoise_pass(sdxl, scheduler, state, latents, cond, step_done,
                                                snapshot_at=resume_at, **rows)
                timings["pass1_s"] = time.perf_counter() - t0
                if config.two_passes:
                    t0 = time.perf_counter()
                    if snapshot is not None:
                        state.begin_pass(2, resume=snapshot)
                        result, _ = denoise_pass(
                            sdxl, snapshot.scheduler, state, snapshot.latents, cond, step_done, start=snapshot.step,
                            **rows,
                        )
                    else:
                        scheduler.set_timesteps(steps, device=self.device)
                        state.begin_pass(2)
                        result, _ = denoise_pass(sdxl, scheduler, state, latents, cond, step_done, **rows)
                    timings["pass2_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            images = result if output_type == "latent" else decode_latents(sdxl, result, output_type)
            timings["decode_s"] = time.perf_counter() - t0
        timings["total_s"] = time.perf_counter() - start
        masks = [m.reshape(grids.coarse).cpu().numpy() for m in state.final_masks["coarse"]]
        return StoryOutput(images=images, seeds=list(seeds), subject_masks=masks, timings=timings)

    def _initial_latents(self, seeds, grids: Grids, latents: torch.Tensor | None) -> torch.Tensor:
        channels = self.sdxl.unet.config.in_channels
        expected = (len(seeds), channels, *grids.latent)
        if latents is None:
            return initial_latents(seeds, expected[1:], self.dtype, self.device)
        if tuple(latents.shape) != expected:
            raise InputError(f"latents must have shape {expected} (B, C, H/8, W/8); got {tuple(latents.shape)}")
        return latents.to(device=self.device, dtype=self.dtype)

    @contextmanager
    def _method_installed(self, state: RunState, config: ConsiStoryConfig) -> Iterator[None]:
        unet = self.sdxl.unet
        originals = unet.attn_processors
        try:
            # set_attn_processor empties the dict it is given: always hand it a copy.
            unet.set_attn_processor(dict(build_processors(dict(originals), state)))
            with self._freeu_installed(config), dift_hook(unet, state):
                yield
        finally:
            unet.set_attn_processor(dict(originals))

    @contextmanager
    def _freeu_installed(self, config: ConsiStoryConfig) -> Iterator[None]:
        unet = self.sdxl.unet
        freeu_before = [{k: getattr(block, k, None) for k in FREEU_KEYS} for block in unet.up_blocks]
        try:
            if config.freeu:
                unet.enable_freeu(s1=config.freeu_s1, s2=config.freeu_s2, b1=config.freeu_b1, b2=config.freeu_b2)
            else:
                unet.disable_freeu()
            yield
        finally:
            for block, values in zip(unet.up_blocks, freeu_before):
                for k, v in values.items():
                    setattr(block, k, v)


def check_codec(codec) -> str:
    if codec not in CODECS:
        raise InputError(f"cache_codec must be one of {', '.join(repr(c) for c in CODECS)} (got {codec!r})")
    return codec


def text_list(values, name: str) -> list[str]:
    """A list of non-empty strings; a bare string is refused rather than split into letters."""
    if isinstance(values, str):
        raise TypeError(f"{name} must be a list of strings, not a single string: use [{values!r}]")
    values = list(values)
    bad = [v for v in values if not isinstance(v, str)]
    if bad:
        raise TypeError(f"{name} must be strings (got {bad[0]!r})")
    return values
