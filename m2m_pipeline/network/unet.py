"""M2M: a Stable Diffusion U-Net whose text cross-attention is replaced by Image-Set Attention (Sec. 5)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention
from einops import rearrange, repeat
from safetensors.torch import save_file
from torch import nn

from m2m_pipeline.io import atomic_directory, read_hashed, sha256_file
from m2m_pipeline.network.conditions import build_task_embedder
from m2m_pipeline.network.config import M2MConfig
from m2m_pipeline.network.context import ContextKV, ImageSetCall
from m2m_pipeline.network.image_set_attention import ImageSetAttnProcessor
from m2m_pipeline.weights import CheckpointError, WeightsNotFoundError, load_weights, resolve_local_path

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def sd_unet_weights(folder: Path, subfolder: str, prefer_ema: bool) -> tuple[str, str | None]:
    """(subfolder, weight variant) of the SD U-Net weights to start from: EMA ones first when asked."""
    if prefer_ema:
        if (folder / f"{subfolder}_ema" / "config.json").is_file():
            return f"{subfolder}_ema", None
        if any((folder / subfolder).glob("diffusion_pytorch_model.ema.*")):
            return subfolder, "ema"
    return subfolder, None


class M2MUNet(nn.Module):
    """eps_theta(z_t^{1:N}, z_0^{1:N}, t) of Eq. 5, for both variants.

    M2M-Self: the clean latents run through the same U-Net at `clean_timestep`; each Image-Set Attention
    layer records their keys/values and lets the clean stream pass unchanged. Because the clean stream
    then depends on neither z_t nor t, running it once in its own pass equals the paper's joint
    [z_0; z_t] forward exactly, and gives a KV cache for free (docs/model.md "Network").
    M2M-DINO: DINOv2 tokens are projected by each layer's K/V weights (Sec. 5.2).
    """

    def __init__(self, config: M2MConfig, unet: UNet2DConditionModel | None = None):
        super().__init__()
        self.config = config
        self.init_source = "random"  # or the SD folder from_stable_diffusion read (logged by training)
        # The frozen encoders its training features came from (EncoderSpec.to_dict(), m2m_pipeline/encoders.py);
        # set by training from the feature manifests, saved in config.json, used by m2m_pipeline.bundle.
        self.encoder_spec: dict[str, Any] | None = None
        self.unet = unet if unet is not None else UNet2DConditionModel(**config.unet_kwargs())
        self.task_embedder = build_task_embedder(config.task, config.task_embed_dim, config.camera_dim)
        task_dim = config.task_embed_dim if self.task_embedder is not None else None
        # E_c for M2M-DINO: the context images' conditions are added to their DINO tokens (Sec. 6.2).
        self.dino_task_proj = None
        if task_dim and config.variant == "dino":
            self.dino_task_proj = nn.Linear(task_dim, config.dino_dim, bias=False)
            nn.init.zeros_(self.dino_task_proj.weight)
        self.isa_layers: list[Attention] = []  # plain list: the modules are registered inside the U-Net
        for block in self.unet.modules():
            if isinstance(block, BasicTransformerBlock) and block.attn2 is not None:
                block.attn2 = self._image_set_attention(block.attn2, len(self.isa_layers), task_dim)
                self.isa_layers.append(block.attn2)
        if not self.isa_layers:
            raise ValueError("M2MUNet: the U-Net has no transformer block with cross-attention to replace")

    def _image_set_attention(self, text_attn: Attention, index: int, task_dim: int | None) -> Attention:
        heads = text_attn.heads
        kv_dim = text_attn.query_dim if self.config.variant == "self" else self.config.dino_dim
        attn = Attention(
            query_dim=text_attn.query_dim, cross_attention_dim=kv_dim, heads=heads,
            dim_head=text_attn.inner_dim // heads, bias=text_attn.to_q.bias is not None,
            out_bias=text_attn.to_out[0].bias is not None, upcast_attention=text_attn.upcast_attention,
        )
        attn.set_processor(ImageSetAttnProcessor(
            index, text_attn.query_dim, attn.inner_dim, heads, task_dim,
            clean_stream_cond=self.config.variant == "self", spatial_bias=self.config.spatial_bias,
        ))
        return attn

    @property
    def variant(self) -> str:
        return self.config.variant

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    # ------------------------------------------------------------------ task conditions
    def embed_task(self, task_cond: torch.Tensor | None, drop_task: torch.Tensor | None, b: int, n: int
                   ) -> torch.Tensor | None:
        """E(c) for (B, N) images -> (B*N, task_embed_dim), zero where the task condition is dropped."""
        if self.task_embedder is None or task_cond is None:
            if task_cond is not None:
                raise ValueError("task_cond given, but this model has no task condition (config.task == 'none')")
            return None
        if task_cond.shape[:2] != (b, n):
            raise ValueError(f"task_cond must start with (B, N) = ({b}, {n}), got {tuple(task_cond.shape)}")
        e = self.task_embedder(task_cond.to(self.device))  # (B, N, task_embed_dim)
        if drop_task is not None:
            e = e * (~drop_task.to(e.device)).to(e.dtype)[:, None, None]
        return rearrange(e, "b n d -> (b n) d").to(self.dtype)

    # ------------------------------------------------------------------ context (keys / values)
    def encode_context(self, context: torch.Tensor, task_cond: torch.Tensor | None = None,
                       drop_task: torch.Tensor | None = None, context_t: torch.Tensor | None = None) -> ContextKV:
        """Keys/values of every Image-Set Attention layer for clean context images.

        context: (B, n, C, H, W) clean latents (self) or (B, n, S, D) DINO tokens (dino). n may be 0.
        context_t: (B,) timestep the context latents were noised to (context-noise augmentation, M2M-Self: the
        clean stream runs at clean_timestep + context_t; None or 0: clean, exactly as without it).
        Each image's entries depend on that image and its own task condition only.
        """
        self._check_context(context)
        b, n = context.shape[:2]
        if context_t is not None and self.variant != "self" and bool((context_t != 0).any()):
            raise ValueError("context noise (context_t) is defined for M2M-Self only: M2M-DINO attends to DINO "
                             "tokens, not to latents a timestep describes")
        if n == 0:
            empty = [context.new_zeros(b, 0, 1, a.inner_dim) for a in self.isa_layers]
            return ContextKV(empty, list(empty))
        cond = self.embed_task(task_cond, drop_task, b, n)  # (B*n, d) or None
        if self.variant == "dino":
            v = rearrange(context, "b n s d -> (b n) s d").to(self.dtype)
            if cond is not None and self.dino_task_proj is not None:
                v = v + self.dino_task_proj(cond)[:, None]  # v = v + E_c(c_C)
            kv = [a.processor.project_context(a, v, n) for a in self.isa_layers]
            return ContextKV([k for k, _ in kv], [v_ for _, v_ in kv])
        record = ContextKV([None] * len(self.isa_layers), [None] * len(self.isa_layers))  # type: ignore[list-item]
        z_0 = rearrange(context, "b n c h w -> (b n) c h w").to(self.dtype)
        t_clean = torch.full((b * n,), self.config.clean_timestep, device=z_0.device, dtype=torch.long)
        if context_t is not None:  # (B,) -> every image of set b at its set's level
            t_clean = t_clean + context_t.to(z_0.device, torch.long).repeat_interleave(n)
        self.unet(self._patchify(z_0), t_clean,
                  encoder_hidden_states=ImageSetCall("record", n, record=record, kv_cond=cond))
        return record

    def _patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(M, C, H, W) -> (M, C p^2, H / p, W / p): the grid the U-Net runs on (M2MConfig.patch_size)."""
        p = self.config.patch_size
        return x if p == 1 else F.pixel_unshuffle(x, p)

    def _unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        p = self.config.patch_size
        return x if p == 1 else F.pixel_shuffle(x, p)

    # ------------------------------------------------------------------ noisy stream
    def denoise(self, z_t: torch.Tensor, t: torch.Tensor, context_kv: ContextKV | None, *,
                ctx_index: torch.Tensor | None = None, task_cond: torch.Tensor | None = None,
                drop_task: torch.Tensor | None = None, first_position: int = 0) -> torch.Tensor:
        """eps for z_t (B, N, C, H, W) given precomputed context keys/values.

        ctx_index: (B,) row of `context_kv` for each set, -1 where the image condition is dropped
        (None: row b uses row b). z_t[:, i] attends to context images [0, first_position + i).
        """
        b, n, c, h, w = self._check_latents(z_t, "z_t")
        t = self._broadcast_t(t, b, n)
        if ctx_index is None and context_kv is not None and context_kv.num_images > 0 \
                and context_kv.batch_size != b:
            raise ValueError(f"context has {context_kv.batch_size} sets but z_t has {b}; pass ctx_index")
        n_ctx = 0 if context_kv is None else context_kv.num_images
        if n_ctx and n_ctx < first_position + n - 1:
            raise ValueError(f"context holds {n_ctx} images but z_t[:, {n - 1}] at first_position={first_position} "
                             f"needs {first_position + n - 1}")
        call = ImageSetCall("attend", n, context=context_kv, ctx_index=ctx_index, first_position=first_position,
                            q_cond=self.embed_task(task_cond, drop_task, b, n))
        x = rearrange(z_t, "b n c h w -> (b n) c h w").to(self.dtype)
        eps = self._unpatchify(self.unet(self._patchify(x), rearrange(t, "b n -> (b n)"),
                                         encoder_hidden_states=call).sample)
        return rearrange(eps, "(b n) c h w -> b n c h w", n=n)

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None,
                task_cond: torch.Tensor | None = None, *, context_task_cond: torch.Tensor | None = None,
                drop_image: torch.Tensor | None = None, drop_task: torch.Tensor | None = None,
                first_position: int = 0, context_t: torch.Tensor | None = None) -> torch.Tensor:
        """eps_theta(z_t, z_0, t[, c]) -> (B, N, C, H, W).

        z_t: (B, N, C, H, W) noisy latents; t: (B,) or (B, N); context: (B, n_c, C, H, W) clean latents
        (self) or (B, n_c, S, D) DINO tokens (dino), with n_c >= first_position + N - 1; task_cond:
        (B, N, ...) target conditions of z_t's images; context_task_cond: the context images' conditions
        (default: task_cond when the context is the same set, first_position == 0).
        drop_image / drop_task: (B,) bool, classifier-free-guidance drops of each set's conditions.
        context_t: (B,) noise timestep of each set's context latents (M2M-Self context noise; None: clean).
        Output for image i depends only on z_t[:, i], t and context[:, :first_position + i].
        """
        b, n, *_ = self._check_latents(z_t, "z_t")
        if context is None:
            context_kv, ctx_index = None, None
        else:
            if context.shape[0] != b:
                raise ValueError(f"context must have B = {b} sets like z_t, got shape {tuple(context.shape)}")
            if context_task_cond is None and first_position == 0 and task_cond is not None \
                    and context.shape[1] <= task_cond.shape[1]:
                context_task_cond = task_cond[:, : context.shape[1]]
            ctx_index = None
            if drop_image is not None:
                drop_image = drop_image.to(context.device).bool()
                keep = torch.nonzero(~drop_image).squeeze(1)
                # The clean stream is only run for sets that keep their image condition.
                ctx_index = torch.full((b,), -1, dtype=torch.long, device=context.device)
                ctx_index[keep] = torch.arange(keep.numel(), device=context.device)
                context = context.index_select(0, keep)
                if context_task_cond is not None:
                    context_task_cond = context_task_cond.index_select(0, keep.to(context_task_cond.device))
                ctx_drop_task = None if drop_task is None else drop_task.index_select(0, keep.to(drop_task.device))
                if context_t is not None:
                    context_t = context_t.index_select(0, keep.to(context_t.device))
            else:
                ctx_drop_task = drop_task
            context_kv = self.encode_context(context, context_task_cond, ctx_drop_task, context_t) \
                if context.shape[0] else None
        return self.denoise(z_t, t, context_kv, ctx_index=ctx_index, task_cond=task_cond, drop_task=drop_task,
                            first_position=first_position)

    # ------------------------------------------------------------------ validation
    def _check_latents(self, z: torch.Tensor, name: str) -> tuple[int, int, int, int, int]:
        cfg = self.config
        if not isinstance(z, torch.Tensor) or z.ndim != 5 or not z.is_floating_point():
            shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"{name} must be a float tensor (B, N, {cfg.in_channels}, H, W), got {shape}")
        b, n, c, h, w = z.shape
        factor = cfg.spatial_factor
        if c != cfg.in_channels or h % factor or w % factor:
            raise ValueError(f"{name} must be (B, N, {cfg.in_channels}, H, W) with H, W multiples of {factor} "
                             f"(e.g. {cfg.sample_size}), got {tuple(z.shape)}")
        if n < 1:
            raise ValueError(f"{name} must hold at least one image (N >= 1), got {tuple(z.shape)}")
        return b, n, c, h, w

    def _check_context(self, context: torch.Tensor) -> None:
        cfg = self.config
        if self.variant == "dino":
            ok = isinstance(context, torch.Tensor) and context.ndim == 4 and context.is_floating_point() \
                and context.shape[-1] == cfg.dino_dim
            if not ok:
                shape = tuple(context.shape) if isinstance(context, torch.Tensor) else type(context).__name__
                raise ValueError(f"M2M-DINO context must be float DINO tokens (B, n, S, {cfg.dino_dim}) "
                                 f"(S = {cfg.dino_tokens} for this config), got {shape}")
        elif not isinstance(context, torch.Tensor) or context.ndim != 5 or not context.is_floating_point() \
                or context.shape[2] != cfg.in_channels:
            shape = tuple(context.shape) if isinstance(context, torch.Tensor) else type(context).__name__
            raise ValueError(f"M2M-Self context must be float clean latents (B, n, {cfg.in_channels}, H, W), "
                             f"got {shape}")

    @staticmethod
    def _broadcast_t(t: torch.Tensor | int | float, b: int, n: int) -> torch.Tensor:
        t = torch.as_tensor(t)
        if t.ndim == 0:
            return t.expand(b, n)
        if t.shape == (b,):
            return repeat(t, "b -> b n", n=n)
        if t.shape == (b, n):
            return t
        raise ValueError(f"t must be a scalar, (B,) = ({b},) or (B, N) = ({b}, {n}), got {tuple(t.shape)}")

    # ------------------------------------------------------------------ weights
    @classmethod
    def from_stable_diffusion(cls, path: str | os.PathLike, config: M2MConfig | None = None,
                              subfolder: str = "unet", prefer_ema: bool = True) -> M2MUNet:
        """Sec. 6.1: SD weights everywhere except the text cross-attention; Image-Set Attention from scratch.

        `path` is a Stable Diffusion pipeline folder; its U-Net dimensions win over `config`'s, which supplies
        the variant and the Image-Set Attention settings. The paper starts from SD 2.1-base's EMA weights; with
        `prefer_ema` they are taken from `unet_ema/` (what diffusers' training scripts write) or from an "ema"
        weight variant of `unet/` (`diffusion_pytorch_model.ema.safetensors`) when the folder has one, else
        from `unet/` (the released SD 2.1-base `unet/` already holds its EMA weights).
        """
        local = resolve_local_path(path, subfolder=subfolder, what="Stable Diffusion U-Net")
        subfolder, variant = sd_unet_weights(Path(local), subfolder, prefer_ema)
        sd_unet = UNet2DConditionModel.from_pretrained(local, subfolder=subfolder, variant=variant,
                                                       use_safetensors=True)  # never a pickled .bin
        cfg = M2MConfig.from_unet_config(dict(sd_unet.config), base=config or M2MConfig())
        net = cls(cfg, unet=sd_unet)
        net.init_source = f"{local}/{subfolder}" + (f" (variant {variant})" if variant else "")
        return net

    def save_pretrained(self, directory: str | os.PathLike,
                        state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """config.json (the whole M2MConfig, the encoder spec) + model.safetensors, written atomically.

        state_dict: weights to write instead of this module's own (e.g. its EMA weights during training).
        config.json records the sha256 of model.safetensors, which from_pretrained checks before it trusts them.

        Hand-written rather than diffusers' ModelMixin because M2MConfig is a nested dataclass, not flat
        __init__ kwargs; the on-disk format is the same idea: JSON config + safetensors, no pickle.
        """
        directory = Path(directory)
        with atomic_directory(directory) as tmp:
            state = {k: v.detach().contiguous().cpu() for k, v in (state_dict or self.state_dict()).items()}
            save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
            meta = {"_class_name": type(self).__name__, "m2m_config": self.config.to_dict(),
                    "weights_sha256": sha256_file(tmp / WEIGHTS_NAME), "encoder_spec": self.encoder_spec}
            (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True))
        return directory

    @staticmethod
    def read_config(directory: str | os.PathLike) -> M2MConfig:
        """The M2MConfig saved in a checkpoint folder's config.json; errors name the file and the field."""
        path = Path(directory) / CONFIG_NAME
        return config_from_json(path.read_bytes(), path)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> "M2MUNet":
        directory = Path(directory)
        if not (directory / CONFIG_NAME).is_file() or not (directory / WEIGHTS_NAME).is_file():
            raise WeightsNotFoundError(
                f"M2M checkpoint {directory} must hold {CONFIG_NAME} and {WEIGHTS_NAME}; weights are never "
                f"downloaded (offline)"
            )
        config_bytes = (directory / CONFIG_NAME).read_bytes()
        net = cls(config_from_json(config_bytes, directory / CONFIG_NAME))
        expected = json.loads(config_bytes).get("weights_sha256")  # absent in folders written before it was
        data, digest = read_hashed(directory / WEIGHTS_NAME)
        if expected is not None and digest != expected:
            raise CheckpointError(f"{directory / WEIGHTS_NAME}: sha256 {digest[:12]}.. does not match the "
                                  f"weights_sha256 {str(expected)[:12]}.. of {CONFIG_NAME}; the file is corrupt or "
                                  f"was replaced")
        load_weights(net, data, directory / WEIGHTS_NAME, map_location)
        net.encoder_spec = json.loads(config_bytes).get("encoder_spec")  # None: written before it was recorded
        return net.to(map_location)


# Fields added to M2MConfig after checkpoints were first written, and the value that reproduces the network of
# before: a config.json without them still loads. Any other missing field is an error naming it.
ADDED_FIELDS: dict[str, Any] = {"prediction_type": "epsilon", "spatial_bias": False}


def config_from_json(data: bytes, path: Path) -> M2MConfig:
    """Parse a config.json's bytes into an M2MConfig; a bad file, a missing or unknown field, or a value of the
    wrong type raises CheckpointError naming the file and the field (no traceback deep in the network)."""
    try:
        meta = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exn:
        raise CheckpointError(f"{path}: not a JSON text file (byte {exn.start} is not UTF-8)") from None
    except json.JSONDecodeError as exn:
        raise CheckpointError(f"{path}: not valid JSON ({exn.msg} at line {exn.lineno} column {exn.colno})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("m2m_config"), dict):
        raise CheckpointError(f"{path}: not an M2M checkpoint (no 'm2m_config' field)")
    fields = {f.name: f for f in dataclasses.fields(M2MConfig)}
    given = meta["m2m_config"]
    unknown = sorted(set(given) - set(fields))
    missing = sorted(set(fields) - set(given) - set(ADDED_FIELDS))
    if unknown or missing:
        what = "; ".join(part for part in (f"unknown field(s) {unknown}" if unknown else "",
                                           f"missing field(s) {missing}" if missing else "") if part)
        raise CheckpointError(f"{path}: m2m_config has {what}")
    defaults = M2MConfig()
    for name, value in given.items():
        if not _same_kind(value, getattr(defaults, name)):
            raise CheckpointError(f"{path}: field m2m_config.{name} = {value!r} has the wrong type "
                                  f"(expected {type(getattr(defaults, name)).__name__})")
    try:
        return M2MConfig.from_dict({**{k: v for k, v in ADDED_FIELDS.items() if k not in given}, **given})
    except (TypeError, ValueError) as exn:
        raise CheckpointError(f"{path}: {exn}") from None


def _same_kind(value: Any, default: Any) -> bool:
    """JSON value vs the field's default: ints for ints (bools are not), numbers for floats, lists for tuples;
    attention_head_dim takes an int or a list."""
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, tuple):
        return isinstance(value, list) or (isinstance(value, int) and not isinstance(value, bool))
    if isinstance(default, str):
        return isinstance(value, str)
    if isinstance(default, dict):
        return isinstance(value, dict)
    return True
