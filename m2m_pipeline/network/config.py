"""M2M network configuration: one frozen dataclass, named presets (tiny, demo, paper)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal

Variant = Literal["self", "dino"]
TaskKind = Literal["none", "camera", "position"]

# The U-Net fields below mirror diffusers.UNet2DConditionModel's config keys one to one, so an SD U-Net
# config maps onto M2MConfig without translation.
UNET_FIELDS = (
    "sample_size", "in_channels", "out_channels", "block_out_channels", "down_block_types", "up_block_types",
    "mid_block_type", "layers_per_block", "attention_head_dim", "norm_num_groups", "cross_attention_dim",
    "transformer_layers_per_block", "use_linear_projection", "upcast_attention", "flip_sin_to_cos",
    "freq_shift", "act_fn", "resnet_time_scale_shift", "only_cross_attention", "dual_cross_attention",
)


@dataclass(frozen=True)
class M2MConfig:
    # --- M2M (Sec. 5) ---
    variant: Variant = "self"              # "self": clean latents through the same U-Net; "dino": DINOv2 tokens
    clean_timestep: int = 0                # timestep the clean stream of M2M-Self is run at (docs/model.md "Network")
    dino_dim: int = 1536                   # D: width of DINO tokens (dinov2-giant: 1536)
    dino_tokens: int = 257                 # S: tokens per image (CLS + 16x16 patches at 224 px)
    task: TaskKind = "none"                # task condition c_C of Sec. 6.2
    task_embed_dim: int = 1280             # width of E(c_C) before the per-layer projections
    camera_dim: int = 12                   # flattened 3x4 relative extrinsic (docs/tasks.md "Novel view synthesis")
    # Relative spatial-position logits in Image-Set Attention (not in the paper; network/spatial_bias.py).
    # Off for MIS training, as in the paper; task fine-tuning turns it on (FinetuneConfig.spatial_bias).
    spatial_bias: bool = False
    # --- diffusion process (used by the objective and the samplers; saved with the network) ---
    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"   # SD's schedule; pixel-space presets use DDPM's "linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    # What the network predicts: SD-2.1-base predicts eps. The CPU presets predict v (Salimans & Ho 2022):
    # at high noise v ~ -z_0, so the loss rewards reading the set's look from the context early in training,
    # where an eps target is nearly z_t itself and barely depends on the context (docs/model.md).
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    # --- images ---
    autoencoder: Literal["pixel", "vae"] = "vae"  # pixel: identity (CPU presets); vae: SD's AutoencoderKL
    image_size: int = 512                  # pixels; latents are image_size / downsample
    # Space-to-depth patches of the diffusion space (DiT / "simple diffusion"'s patchify, a linear "latent"):
    # the U-Net sees (C p^2, H / p, W / p) and its output is shuffled back; the noise and the loss stay in
    # the (C, H, W) space below, so p = 1 is the plain U-Net. A lossless, free alternative to a learned
    # autoencoder for the CPU presets (ablation row patch4-*, docs/model.md).
    patch_size: int = 1
    # --- U-Net (diffusers UNet2DConditionModel keys; defaults are SD-2.1-base's) ---
    sample_size: int = 64                  # latent H = W
    in_channels: int = 4                   # latent C
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    layers_per_block: int = 2
    attention_head_dim: tuple[int, ...] | int = (5, 10, 20, 20)  # diffusers' name; it is the number of heads
    norm_num_groups: int = 32
    cross_attention_dim: int = 1024        # text width of the SD U-Net (used only by the SD baseline)
    transformer_layers_per_block: int = 1
    use_linear_projection: bool = True
    upcast_attention: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    act_fn: str = "silu"
    resnet_time_scale_shift: str = "default"
    only_cross_attention: bool = False
    dual_cross_attention: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # other UNet2DConditionModel keys, passed through

    def __post_init__(self) -> None:
        for name in ("block_out_channels", "down_block_types", "up_block_types"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if isinstance(self.attention_head_dim, list):
            object.__setattr__(self, "attention_head_dim", tuple(self.attention_head_dim))
        self.validate()

    def validate(self) -> None:
        if self.variant not in ("self", "dino"):
            raise ValueError(f"M2MConfig.variant must be 'self' or 'dino', got {self.variant!r}")
        if self.task not in ("none", "camera", "position"):
            raise ValueError(f"M2MConfig.task must be 'none', 'camera' or 'position', got {self.task!r}")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"M2MConfig.prediction_type must be 'epsilon' or 'v_prediction', got {self.prediction_type!r}")
        if self.autoencoder not in ("pixel", "vae"):
            raise ValueError(f"M2MConfig.autoencoder must be 'pixel' or 'vae', got {self.autoencoder!r}")
        for name in ("sample_size", "in_channels", "out_channels", "layers_per_block", "dino_dim", "dino_tokens",
                     "task_embed_dim", "image_size", "norm_num_groups", "patch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"M2MConfig.{name} must be positive, got {getattr(self, name)}")
        if self.sample_size % self.patch_size:
            raise ValueError(f"M2MConfig.sample_size {self.sample_size} is not a multiple of patch_size {self.patch_size}")
        if self.clean_timestep < 0:
            raise ValueError(f"M2MConfig.clean_timestep must be >= 0, got {self.clean_timestep}")
        if len(self.down_block_types) != len(self.block_out_channels) or len(self.up_block_types) != len(
            self.block_out_channels
        ):
            raise ValueError("M2MConfig: down_block_types, up_block_types and block_out_channels must have equal length")
        if not any("CrossAttn" in t for t in self.down_block_types + self.up_block_types + (self.mid_block_type,)):
            raise ValueError("M2MConfig: the U-Net has no cross-attention block to turn into Image-Set Attention")

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str, variant: Variant = "self", **overrides: Any) -> "M2MConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], variant=variant, **overrides)

    def is_sd_sized(self) -> bool:
        """Whether this U-Net has SD-2.1-base's architecture (the paper preset's): one meant to start from SD's
        weights (Sec. 6.1) rather than be trained from random ones."""
        return self.unet_kwargs() == PRESETS["paper"].unet_kwargs()

    def scheduler_kwargs(self) -> dict[str, Any]:
        """Arguments of diffusers' DDPMScheduler / DDIMScheduler for this model's noise schedule."""
        return dict(num_train_timesteps=self.num_train_timesteps, beta_schedule=self.beta_schedule,
                    beta_start=self.beta_start, beta_end=self.beta_end, prediction_type=self.prediction_type,
                    clip_sample=False)

    def unet_kwargs(self) -> dict[str, Any]:
        kw = {k: getattr(self, k) for k in UNET_FIELDS}
        for k in ("block_out_channels", "down_block_types", "up_block_types", "attention_head_dim"):
            if isinstance(kw[k], tuple):
                kw[k] = list(kw[k])
        p = self.patch_size  # the U-Net works on the patchified grid (network/unet.py)
        kw.update(in_channels=self.in_channels * p * p, out_channels=self.out_channels * p * p,
                  sample_size=self.sample_size // p)
        kw.update(self.extra)
        return kw

    @property
    def spatial_factor(self) -> int:
        """Diffusion-space pixels per pixel of the U-Net's coarsest level: H and W must be multiples of it."""
        return self.patch_size * 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_unet_config(cls, unet_config: dict[str, Any], base: "M2MConfig") -> "M2MConfig":
        """`base` with its U-Net fields taken from a diffusers UNet2DConditionModel config (the SD U-Net wins)."""
        from diffusers import UNet2DConditionModel

        known = set(UNET_FIELDS)
        defaults = UNet2DConditionModel.extract_init_dict({})[0]
        updates = {k: unet_config[k] for k in UNET_FIELDS if k in unet_config}
        # Any other key that differs from diffusers' default must travel too, or the rebuilt U-Net differs.
        extra = {k: v for k, v in unet_config.items()
                 if not k.startswith("_") and k not in known and k in defaults and defaults[k] != v}
        if isinstance(updates.get("transformer_layers_per_block"), (list, tuple)):
            extra["transformer_layers_per_block"] = updates.pop("transformer_layers_per_block")
        return dataclasses.replace(base, **updates, extra=extra)

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "M2MConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"M2MConfig: unknown field(s) {unknown}")
        return cls(**d)


_PAPER = M2MConfig()

# Named noise schedules (the beta fields of M2MConfig): DDPM's linear one, which the CPU presets started
# from, and SD's scaled-linear one (the paper's). docs/model.md ("The base model") measures them at demo size.
NOISE_SCHEDULES: dict[str, dict[str, Any]] = {
    "linear": {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02},
    "scaled_linear": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
}

PRESETS: dict[str, M2MConfig] = {
    # Tests: seconds on a CPU. Pixel space, 16 px, Image-Set Attention at every resolution.
    "tiny": M2MConfig(
        autoencoder="pixel", image_size=16, sample_size=16, in_channels=3, out_channels=3,
        block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
        attention_head_dim=2, norm_num_groups=8, cross_attention_dim=32, dino_dim=32, dino_tokens=5,
        task_embed_dim=32, beta_schedule="linear", beta_start=1e-4, beta_end=0.02, prediction_type="v_prediction",
    ),
    # Smoke chain and CI: the latent path at tiny size, on the tiny autoencoder's 4x4x4 latents of 16 px images.
    "tiny-latent": M2MConfig(
        autoencoder="vae", image_size=16, sample_size=4, in_channels=4, out_channels=4,
        block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
        attention_head_dim=2, norm_num_groups=8, cross_attention_dim=32, dino_dim=32, dino_tokens=5,
        task_embed_dim=32, beta_schedule="linear", beta_start=1e-4, beta_end=0.02, prediction_type="v_prediction",
    ),
    # CPU demo: the paper's latent path at CPU size. 32 px images -> 8x8x8 latents of the demo autoencoder
    # (m2m_pipeline/autoencoder.py, in SD's VAE role); Image-Set Attention at 8 and 4 latent pixels.
    # Widths 32/64 (~1.1 M parameters): in 15 one-core minutes the 64/128 U-Net (4.2 M) makes ~1300 steps and
    # learns the background worse (0.77 vs 0.96 at position 1); docs/model.md has the measurements.
    # SD's scaled-linear schedule: at equal time the base model draws the named shape at 0.49 instead of 0.41
    # with DDPM's linear one (docs/model.md, "The base model").
    "demo": M2MConfig(
        autoencoder="vae", image_size=32, sample_size=8, in_channels=8, out_channels=8,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
        attention_head_dim=(2, 4), norm_num_groups=16, cross_attention_dim=256, dino_dim=96, dino_tokens=17,
        task_embed_dim=128, prediction_type="v_prediction", **NOISE_SCHEDULES["scaled_linear"],
    ),
    # The pixel-space CPU preset the demo used before its autoencoder (kept for the ablation, docs/model.md):
    # 32 px, ~2.75 M parameters. Image-Set Attention at 16 and 8 px only: at 32 px every
    # context image adds 1024 keys per query, which would dominate a CPU's sampling time (see benchmarks).
    "demo-pixel": M2MConfig(
        autoencoder="pixel", image_size=32, sample_size=32, in_channels=3, out_channels=3,
        block_out_channels=(32, 64, 96), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
        attention_head_dim=(2, 4, 4), norm_num_groups=16, cross_attention_dim=256, dino_dim=96, dino_tokens=17,
        task_embed_dim=128, beta_schedule="linear", beta_start=1e-4, beta_end=0.02, prediction_type="v_prediction",
    ),
    # The paper: SD-2.1-base U-Net on 64x64x4 latents, DINOv2-giant tokens.
    "paper": _PAPER,
}
