"""Service settings: the builder's `args` (serve_config.yaml), validated once at build time.

Everything a deployment needs to know travels as one `ServiceSettings`: the model to load, the
request defaults and limits, the artifact store, the caches' bounds and each deployment's
resources. A typo in the config fails `serve run` with the field's name, not a replica crash.
"""

from __future__ import annotations

import logging
import warnings
from typing import Annotated, Any, Literal, Optional

from consistory.loading import model_id, parse_preset
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from .resources import DeploymentResources, EdgeSettings, GeneratorResources

logger = logging.getLogger("ray.serve")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(value: Any) -> Any:
    """A byte count from an int or a string such as "8GB", "512 MiB" (decimal and binary units)."""
    if not isinstance(value, str):
        return value
    text = value.strip().upper().replace(" ", "")
    number = text.rstrip("KMGTIB")
    unit = text[len(number):]
    if unit not in _UNITS or not number:
        raise ValueError(f"{value!r} is not a byte size; write e.g. 8000000000, \"8GB\" or \"512MiB\"")
    return int(float(number) * _UNITS[unit])


ByteSize = Annotated[int, BeforeValidator(parse_bytes), Field(ge=1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RequestDefaults(_Strict):
    """Values used where a request leaves a field out (the published method's, at 1024 px)."""

    steps: int = Field(50, ge=1)
    height: int = 1024
    width: int = 1024
    guidance_scale: float = Field(5.0, ge=0)
    mask_dropout: float = Field(0.5, ge=0, le=1)
    n_anchors: int = Field(2, ge=1)


class RequestLimits(_Strict):
    """Bounds on one request; they keep a single request from holding a GPU for minutes."""

    max_prompts: int = Field(16, ge=1)
    max_anchors: int = Field(4, ge=1)
    # Subject words or phrases in one request (`subjects`); an API key's `max_subjects` is
    # another thing: how many subjects the key may keep stored.
    max_subjects_per_request: int = Field(4, ge=1)
    max_height: int = Field(1024, ge=32)
    max_width: int = Field(1024, ge=32)
    max_steps: int = Field(100, ge=1)
    max_prompt_chars: int = Field(1000, ge=1)
    max_subject_chars: int = Field(100, ge=1)
    max_subject_words: int = Field(8, ge=1)
    max_guidance_scale: float = Field(30.0, gt=0, allow_inf_nan=False)
    # Each uploaded image (a photo anchor or a ControlNet control, base64 PNG or JPEG): at most
    # this many bytes (decoded) and this many pixels (width x height).
    max_image_bytes: ByteSize = 4 * 10**6
    max_image_pixels: int = Field(2048 * 2048, ge=1)
    # Larger bodies get 413 before they are parsed. Unset, it is computed (`body_limit`): 64 KiB
    # of text (a full request at the largest limits is ~20 KB) plus the base64 of as many images
    # as a request can carry at `max_image_bytes` each.
    max_body_bytes: Optional[ByteSize] = None

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        """`max_subjects` was this limit's name until it was taken for an API key's quota of
        stored subjects; the old name still works, with a warning."""
        if not isinstance(data, dict) or "max_subjects" not in data:
            return data
        if "max_subjects_per_request" in data:
            raise ValueError("limits.max_subjects is the old name of limits.max_subjects_per_request; keep only "
                             "max_subjects_per_request")
        note = ("limits.max_subjects is deprecated: rename it limits.max_subjects_per_request (subject words "
                "per request; an API key's max_subjects is the number of subjects it may keep)")
        warnings.warn(note, FutureWarning, stacklevel=2)
        logger.warning(note)
        data = dict(data)
        data["max_subjects_per_request"] = data.pop("max_subjects")
        return data


TEXT_BODY_BYTES = 64 * 1024


class ApiKey(_Strict):
    """An API key as the service is configured with it: a name and its token's hash only."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    sha256: str = Field(..., pattern=r"^[0-9a-f]{64}$", description="hex SHA-256 of the token")
    admin: bool = False
    max_subjects: Optional[int] = Field(None, ge=0)  # subjects the key may keep stored
    requests_per_minute: Optional[float] = Field(None, gt=0)
    max_queued_jobs: Optional[int] = Field(None, ge=1)  # unset: `jobs.max_queued_per_key`


class AuthSettings(_Strict):
    """`auth` in the service's args (edge/api_keys.py). Off when no key is configured (a
    laptop); any configured key turns it on (the cluster configs)."""

    # Unset: on exactly when keys are configured (auth.keys, keys_file, CONSISTORY_API_KEYS_FILE).
    # `false` with keys configured is refused: keys that were silently ignored left every
    # subject open to callers with no key.
    enabled: Optional[bool] = None
    keys: list[ApiKey] = Field(default_factory=list)
    # A YAML or JSON list of keys (a mounted Kubernetes Secret, say); CONSISTORY_API_KEYS_FILE wins.
    keys_file: Optional[str] = None

    @model_validator(mode="after")
    def _unique(self) -> "AuthSettings":
        names = [k.name for k in self.keys]
        if len(set(names)) != len(names):
            raise ValueError(f"API key names must be unique; got {names}")
        if self.enabled is False and (self.keys or self.keys_file):
            raise ValueError(_KEYS_BUT_OFF)
        return self

    def on(self, keys_found: bool) -> bool:
        """Whether callers need a key, given whether any key was found (in the config or a
        keys file); refuses keys found with `enabled: false`."""
        if self.enabled is False and keys_found:
            raise ValueError(_KEYS_BUT_OFF)
        return keys_found if self.enabled is None else self.enabled


_KEYS_BUT_OFF = ("auth.enabled is false but API keys are configured: they would be ignored and every subject "
                 "open to callers with no key; remove `enabled: false` (configured keys turn auth on) or the keys")


class JobSettings(_Strict):
    """`jobs` in the service's args: how accepted jobs wait for the model replicas (flow/job_queue.py)."""

    # Jobs one Ingress replica runs at once; the others wait, in order, in the store's queue for
    # any replica with room, rather than all pressing on the model replicas' bounded queues.
    runners_per_replica: int = Field(4, ge=1)
    # Jobs a key may have queued or running (an API key's `max_queued_jobs` overrides it; with
    # auth off, all callers share it); past it POST /v1/jobs answers 429.
    max_queued_per_key: int = Field(100, ge=1)


class RetentionSettings(_Strict):
    """`retention` in the service's args: seconds (None keeps forever); flow/retention.py."""

    images_s: Optional[float] = Field(None, gt=0)
    subjects_s: Optional[float] = Field(None, gt=0)
    jobs_s: Optional[float] = Field(None, gt=0)
    interval_s: float = Field(3600.0, gt=0)
    collect: bool = True


class ServiceSettings(_Strict):
    # "preset:tiny" (offline random weights, optionally "preset:tiny:<seed>"), a hub id such as
    # "stabilityai/stable-diffusion-xl-base-1.0", or a local directory.
    model: str = "preset:tiny"
    device: str = "auto"  # "auto" picks cuda when present
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"  # auto: fp16 on GPU, fp32 on CPU
    variant: Optional[str] = None  # e.g. "fp16" for SDXL base's half-precision weight files
    torch_threads: Optional[int] = Field(None, ge=1)  # per model replica; None leaves torch's choice
    # A ControlNet for the requests' `controls`: None (requests with controls get 422),
    # "preset:tiny" (a seeded random ControlNet on a preset's UNet, as the CLI's `--controlnet
    # tiny`; "preset:tiny:<seed>"), a hub id of an SDXL ControlNet, or a local directory.
    controlnet: Optional[str] = None
    # Run the model replicas' UNet under torch.compile (ConsiStoryPipeline.compile): it pays on
    # GPUs (CUDA graphs), not on CPUs.
    compile: bool = False
    # Each model replica makes one short generation at the default size before it is ready (and
    # compiles there, with `compile`), so that its first request costs what the next ones do.
    warm_up: bool = True
    # Extra ConsiStoryConfig fields applied to every request (e.g. {"freeu": false}).
    method: dict[str, Any] = Field(default_factory=dict)
    defaults: RequestDefaults = RequestDefaults()
    limits: RequestLimits = RequestLimits()
    # artifact_store_from_config settings; CONSISTORY_STORE* / CONSISTORY_S3_* env vars win.
    store: dict[str, Any] = Field(default_factory=dict)
    # How anchor caches are stored: "exact" (as computed) or "compact" (8 bits or fewer per
    # value, about 1/6 of the bytes; new images deviate by a few percent of the method's effect).
    cache_codec: Literal["exact", "compact"] = "exact"
    # Bytes of anchor caches a Generator replica keeps (least recently used first out); a cache
    # larger than this alone is still kept while it is the only one.
    cache_lru_bytes: ByteSize = 8 * 10**9
    # Caches cross the object store and S3 in chunks of at most this size.
    cache_chunk_bytes: ByteSize = 256 * 2**20
    # Where a Generator keeps its caches: "device" (copied to the model's device once) or "host"
    # (read in place from the node's shared object store, each layer copied to the GPU as the
    # denoising loop needs it).
    cache_memory: Literal["device", "host"] = "device"
    ingress_cache_refs: int = Field(64, ge=0)  # cache ObjectRefs the Ingress keeps alive
    object_fetch_timeout_s: float = Field(60.0, gt=0)  # past this a cache is reloaded from the store
    # One replica rebuilds a lost cache while the others wait; a rebuild taking longer than this
    # (its replica died) is taken over.
    rebuild_lease_s: float = Field(900.0, gt=0)
    url_expires_s: int = Field(3600, ge=1, le=7 * 24 * 3600)
    # The address clients reach the service at (behind a load balancer: its public URL); local-store
    # image URLs start with it. Unset, they are paths on the service. Never taken from the Host header.
    public_base_url: Optional[str] = Field(None, pattern=r"^https?://[^\s/?#]+(/[^\s?#]*)?$")
    # Signs local-store image URLs; CONSISTORY_URL_SIGNING_KEY wins. Unset, the first Ingress
    # replica stores a random key in the artifact store and every replica uses that one.
    url_signing_key: Optional[str] = Field(None, min_length=16)
    # API keys (hashes only), ownership and per-key quotas: see edge/api_keys.py and edge/access.py.
    auth: AuthSettings = AuthSettings()
    # How long images and subjects are kept, and the collector that deletes them (flow/retention.py).
    retention: RetentionSettings = RetentionSettings()
    jobs: JobSettings = JobSettings()
    # Replica logs as text or one JSON object per line (with Serve's request_id, which is the
    # X-Request-ID the client sees), for log pipelines behind a load balancer.
    log_encoding: Literal["TEXT", "JSON"] = "TEXT"
    ready_cache_s: float = Field(2.0, ge=0)  # /readyz answers from a cache this young
    # No request runs longer than this, whatever timeout headers a client sends the proxy; keep
    # it at or under the proxy's request_timeout_s.
    request_deadline_s: float = Field(600.0, gt=0)
    retry_after_s: float = Field(5.0, ge=0)
    ready_timeout_s: float = Field(5.0, gt=0)
    ingress: DeploymentResources = DeploymentResources(
        num_cpus=0.1, max_ongoing_requests=64, max_queued_requests=256
    )
    anchor_stage: DeploymentResources = DeploymentResources(
        num_cpus=1.0, max_ongoing_requests=4, max_queued_requests=32
    )
    generator: GeneratorResources = GeneratorResources(
        num_cpus=1.0, min_replicas=1, max_replicas=2, max_ongoing_requests=8, max_queued_requests=128
    )
    # What clients may hold of each Ingress replica: requests in flight, event streams, header
    # bytes, how slowly a body may arrive (resources.py).
    edge: EdgeSettings = EdgeSettings()

    @model_validator(mode="after")
    def _defaults_within_limits(self) -> "ServiceSettings":
        d, lim = self.defaults, self.limits
        for name, value, bound in (
            ("steps", d.steps, lim.max_steps),
            ("height", d.height, lim.max_height),
            ("width", d.width, lim.max_width),
            ("n_anchors", d.n_anchors, lim.max_anchors),
        ):
            if value > bound:
                raise ValueError(f"defaults.{name} ({value}) is above its limit ({bound})")
        self.base_config()  # the method's own checks (multiples of 8, ranges) at build time
        # A malformed "preset:..." fails here, not in a replica.
        self.model_id
        if self.controlnet:
            parse_preset(self.controlnet)
        self.edge.check_fits(self.ingress)
        return self

    @property
    def body_limit(self) -> int:
        """Bytes a request body may have: `limits.max_body_bytes`, or computed from the image
        limits (a photo per anchor, and with a ControlNet a control per prompt, in base64)."""
        lim = self.limits
        if lim.max_body_bytes is not None:
            return lim.max_body_bytes
        images = lim.max_anchors + (lim.max_prompts if self.controlnet else 0)
        return TEXT_BODY_BYTES + images * (4 * -(-lim.max_image_bytes // 3) + 64)

    @classmethod
    def from_args(cls, args: dict[str, Any] | None) -> "ServiceSettings":
        return cls.model_validate(dict(args or {}))

    @property
    def model_id(self) -> str:
        """The id the library gives the loaded model (recorded in caches and subject records)."""
        return model_id(self.model)

    def base_config(self):
        """The ConsiStoryConfig of a request that sets nothing."""
        from consistory.config import ConsiStoryConfig

        d = self.defaults
        return ConsiStoryConfig(
            num_inference_steps=d.steps,
            height=d.height,
            width=d.width,
            guidance_scale=d.guidance_scale,
            mask_dropout=d.mask_dropout,
            n_anchors=d.n_anchors,
        ).replace(**self.method)
