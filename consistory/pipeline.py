"""ConsiStoryPipeline: the method on a stock diffusers StableDiffusionXLPipeline."""

from __future__ import annotations

import threading
import time
from typing import Any, Sequence

import torch

from .cache.anchor_cache import AnchorCache
from .cache.codecs import CODECS
from .cache.fingerprint import unet_fingerprint
from .config import ConsiStoryConfig
from .errors import InputError
from .inputs.control import check_controlnet
from .inputs.image_inputs import ImageInputs
from .method.anchors import CachedAnchors, LiveAnchors
from .method.compiled_unet import set_compiled
from .method.passes import Request, run_passes
from .outputs import AnchorsOutput, StoryOutput
from .progress import ProgressCallback
from .seeds import check_seeds, consecutive_seeds


class ConsiStoryPipeline:
    """Consistent subjects across images, training-free, on SDXL.

    The wrapped pipeline is left as it was: the method's attention processors, FreeU and the DIFT
    hook are installed only while generating and removed afterwards, even on error.
    """

    def __init__(self, sdxl, model_id: str | None = None, controlnet=None, compile: bool = False) -> None:
        self.sdxl = sdxl
        # A StableDiffusionXLControlNetPipeline brings its own ControlNet.
        self.controlnet = controlnet if controlnet is not None else getattr(sdxl, "controlnet", None)
        check_controlnet(self.controlnet)
        self.model_id = model_id or getattr(sdxl, "name_or_path", None) or sdxl.__class__.__name__
        self.progress_bar = True
        # Pass 2 starts from pass 1's state at step S // 10 (exact); False runs it from step 0,
        # which gives the same images at the cost of the repeated steps (kept for checking that).
        self.resume_pass2 = True
        # Run the UNet under torch.compile (see consistory.method.compiled_unet): graphs are made
        # at the first generation of each image size and batch size, then reused. Off by default:
        # it pays on a GPU, not on a CPU. Takes effect at the next generation.
        self.compile = compile
        self._fingerprint: str | None = None
        # Generation swaps the UNet's processors: one generation at a time per pipeline.
        self._lock = threading.Lock()

    # --- construction ---
    @classmethod
    def from_pretrained(cls, model_id_or_path: str, controlnet=None, compile: bool = False,
                        **diffusers_kwargs: Any) -> "ConsiStoryPipeline":
        """Load SDXL weights (hub id or local directory) and use DDIM as the method specifies;
        `controlnet`: an SDXL `ControlNetModel` (hub or directory) for `control_images`;
        `compile`: run the UNet under torch.compile (the `compile` attribute)."""
        from diffusers import DDIMScheduler, StableDiffusionXLPipeline

        sdxl = StableDiffusionXLPipeline.from_pretrained(model_id_or_path, **diffusers_kwargs)
        sdxl.scheduler = DDIMScheduler.from_config(sdxl.scheduler.config)
        if controlnet is not None:
            controlnet = controlnet.to(device=sdxl.unet.device, dtype=sdxl.unet.dtype)
        return cls(sdxl, model_id=str(model_id_or_path), controlnet=controlnet, compile=compile)

    @classmethod
    def from_sdxl(cls, pipe, model_id: str | None = None, controlnet=None, compile: bool = False) -> "ConsiStoryPipeline":
        """Wrap an existing StableDiffusionXLPipeline or StableDiffusionXLControlNetPipeline (its
        scheduler is used as it is)."""
        return cls(pipe, model_id=model_id, controlnet=controlnet, compile=compile)

    @classmethod
    def from_preset(cls, name: str, seed: int = 0, compile: bool = False, **kwargs: Any) -> "ConsiStoryPipeline":
        """Random-weight SDXL-topology presets ("tiny", "small", "full"); see consistory.presets."""
        from .presets.sdxl import build_preset_sdxl

        return cls(build_preset_sdxl(name, seed=seed, **kwargs), model_id=f"preset:{name}:{seed}", compile=compile)

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
                                     control_guidance, size=(config.height, config.width))
        anchors = LiveAnchors(n_anchors, inputs.batch_rows(len(prompts)))
        return self._run(Request(prompts, subjects, seeds, config, anchors, inputs, latents, output_type, progress))

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
                                     control_guidance, size=(config.height, config.width))
        anchors = LiveAnchors(len(prompts), inputs.batch_rows(len(prompts)), recorder=cache)
        out = self._run(Request(prompts, subjects, seeds, config, anchors, inputs, latents, output_type, progress))
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
                                     control_guidance, size=(config.height, config.width))
        anchors = CachedAnchors(cache, len(prompts))
        return self._run(Request(prompts, cache.subjects, seeds, config, anchors, inputs, latents, output_type, progress))

    def warm_up(self, config: ConsiStoryConfig | None = None, batch_sizes: Sequence[int] = (1,)) -> dict[int, float]:
        """One short story per batch size at `config`'s image size, so that the first real
        request does not pay for what a process does once per shape (compiling the UNet when
        `compile` is on; kernel selection and memory pools otherwise). Stories of b images put
        the UNet in the shapes of every entry point at batch b. Returns seconds per batch size."""
        config = config or self.default_config()
        # Enough steps that query mixing's doubled batch runs, where the real config has it.
        config = config.replace(num_inference_steps=min(config.num_inference_steps, max(2, config.query_mix_divisor)))
        seconds = {}
        for b in batch_sizes:
            t0 = time.perf_counter()
            self.generate_story([f"a photo of a dog in scene {i}" for i in range(b)], ["dog"],
                                config=config.replace(n_anchors=min(config.n_anchors, b)), output_type="np")
            seconds[b] = time.perf_counter() - t0
        return seconds

    def _run(self, request: Request) -> StoryOutput:
        with self._lock:
            set_compiled(self.sdxl.unet, self.compile)
            return run_passes(self.sdxl, request, self.controlnet, self.progress_bar, self.resume_pass2)


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
