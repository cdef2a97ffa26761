"""`m2m plan`: what a profile costs on a cluster, counted on the real architectures (docs/data.md "Paper scale").

Nothing here is a guess about the networks: FLOPs are counted with `torch.utils.flop_counter` and activation
memory with autograd's saved-tensor hooks, both on the *meta* device (shapes only: the paper's 866 M-parameter
U-Net and DINOv2-giant are "run" in milliseconds without memory). What is assumed is named and printed: the
cluster (GPUs, memory, peak TFLOPs, utilisation), the optimizer's bytes per parameter (fp32 master weights,
gradients, AdamW moments, EMA: 20 B), the mean JPEG size of a 512 px image (measured on natural photographs,
`jpeg_bytes_per_image`), and the checkpoint count.

Activation model (per training set of N images, bf16 autocast: 2 bytes per saved element):
- without gradient checkpointing: every tensor autograd saves in one forward of the objective's network call,
  de-duplicated by storage;
- with it (the paper preset): what is saved outside the checkpointed blocks, plus the largest block's own
  saved tensors (recomputed one block at a time during backward).
Meta tensors dispatch attention to PyTorch's math kernel, which saves the s x s probabilities; flash /
memory-efficient attention on a GPU does not, so the activations are an upper bound and the micro-batch
conservative. `benchmarks/gpu_check.py` measures the real peak the day a GPU is lent.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from m2m_pipeline.network import M2MConfig, M2MUNet

OPTIMIZER_BYTES_PER_PARAM = 20  # fp32 weights 4 + grads 4 + AdamW m, v 8 + EMA 4 (mixed precision keeps fp32)
ACTIVATION_BYTES = 2            # bf16 autocast


@dataclass(frozen=True)
class Cluster:
    gpus: int = 64
    gpu_memory_gib: float = 80.0
    gpu_tflops: float = 312.0      # peak dense bf16 (A100: 312, H100 SXM: 989)
    utilisation: float = 0.4       # achieved / peak (MFU)
    headroom_gib: float = 4.0      # CUDA context, allocator fragmentation, NCCL buffers

    def __post_init__(self) -> None:
        for name in ("gpus", "gpu_memory_gib", "gpu_tflops"):
            if getattr(self, name) <= 0:
                raise ValueError(f"Cluster.{name} must be > 0, got {getattr(self, name)}")
        if not 0 < self.utilisation <= 1:
            raise ValueError(f"Cluster.utilisation must be in (0, 1], got {self.utilisation}")


# ----------------------------------------------------------------------------------- counting on meta
def count_flops(fn: Callable[[], Any]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


class SavedBytes:
    """Bytes autograd saves for backward while active (de-duplicated by base tensor), at ACTIVATION_BYTES each
    element; per-module maxima for the modules in `track` (the checkpointed blocks)."""

    def __init__(self, track: list[nn.Module]):
        self.seen: dict[int, tuple[torch.Tensor, int]] = {}
        self.block_max = 0
        self._hooks = [m.register_forward_pre_hook(self._enter) for m in track]
        self._hooks += [m.register_forward_hook(self._leave) for m in track]
        self._start: list[int] = []

    def total(self) -> int:
        return sum(b for _, b in self.seen.values())

    def _pack(self, x: torch.Tensor) -> torch.Tensor:
        base = x._base if x._base is not None else x
        self.seen[id(base)] = (base, base.numel() * ACTIVATION_BYTES if base.is_floating_point()
                               else base.numel() * base.element_size())
        return x

    def _enter(self, module: nn.Module, args: Any) -> None:
        self._start.append(self.total())

    def _leave(self, module: nn.Module, args: Any, out: Any) -> None:
        self.block_max = max(self.block_max, self.total() - self._start.pop())

    def __enter__(self) -> SavedBytes:
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda x: x)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._ctx.__exit__(*exc)
        for h in self._hooks:
            h.remove()


def checkpointed_blocks(net: M2MUNet) -> list[nn.Module]:
    """The modules diffusers' gradient checkpointing recomputes one at a time: resnets and transformers."""
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    return [m for m in net.unet.modules() if isinstance(m, ResnetBlock2D | Transformer2DModel)]


def m2m_inputs(cfg: M2MConfig, b: int, n: int, context_images: int) -> tuple[torch.Tensor, ...]:
    latent = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
    z = torch.zeros(b, n, *latent, device="meta")
    t = torch.zeros(b, n, dtype=torch.long, device="meta")
    shape = (b, context_images, cfg.dino_tokens, cfg.dino_dim) if cfg.variant == "dino" else (b, context_images, *latent)
    return z, t, torch.zeros(shape, device="meta")


def meta_network(cfg: M2MConfig) -> M2MUNet:
    with torch.device("meta"):
        return M2MUNet(cfg).train()


def training_profile(cfg: M2MConfig, n_images: int) -> dict[str, int]:
    """FLOPs (forward + backward + the checkpointing recompute) and activation bytes of one training set."""
    net = meta_network(cfg)
    z, t, ctx = m2m_inputs(cfg, 1, n_images, n_images)  # training attends causally over the set's own images
    forward = count_flops(lambda: net(z, t, ctx))
    with SavedBytes(checkpointed_blocks(net)) as saved:
        net(z, t, ctx)
    full, block = saved.total(), saved.block_max
    net.unet.enable_gradient_checkpointing()
    with SavedBytes([]) as outside:
        net(z, t, ctx)
    return {"parameters": sum(p.numel() for p in net.parameters()), "forward_flops": forward,
            "train_flops": 4 * forward,  # backward ~2x forward, checkpointing recomputes the forward once
            "activation_bytes": full, "activation_bytes_checkpointed": outside.total() + block}


def sampling_flops_per_image(cfg: M2MConfig, steps: int, context_images: int) -> dict[str, int]:
    """One generated image, DDIM `steps`, classifier-free guidance (both branches counted with the context),
    `context_images` preceding images: with M2M-Self's KV cache the clean stream runs once per image (the
    newest context image), without it at every step; M2M-DINO's context projections run once."""
    net = meta_network(cfg).eval()
    z, t, ctx = m2m_inputs(cfg, 2, 1, context_images)
    with torch.no_grad():
        forward = count_flops(lambda: net(z, t, ctx, first_position=context_images))
        encode = count_flops(lambda: net.encode_context(ctx))
    denoise = forward - encode
    return {"cached": steps * denoise + (encode // context_images if cfg.variant == "self" else encode),
            "uncached": steps * forward}


def sd_generation_flops_per_image(steps: int) -> dict[str, int]:
    """MIS: SD-2.1-base U-Net x steps x 2 (CFG) + VAE decode per image; the text encoder is per caption."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from m2m_pipeline.reference_layouts import SD21_VAE, sd21_unet_kwargs

    with torch.device("meta"):
        unet, vae = UNet2DConditionModel(**sd21_unet_kwargs("full")), AutoencoderKL(**SD21_VAE)
        z, text = torch.zeros(2, 4, 64, 64), torch.zeros(2, 77, 1024)
        t = torch.zeros(2, dtype=torch.long)
    with torch.no_grad():
        u = count_flops(lambda: unet(z, t, encoder_hidden_states=text))
        d = count_flops(lambda: vae.decode(z[:1]))
    return {"unet": steps * u, "vae_decode": d, "total": steps * u + d}


def dino_flops_per_image() -> int:
    from transformers import Dinov2Config, Dinov2Model

    from m2m_pipeline.reference_layouts import DINOV2_GIANT

    with torch.device("meta"):
        model = Dinov2Model(Dinov2Config(**DINOV2_GIANT))
        x = torch.zeros(1, 3, 224, 224)
    with torch.no_grad():
        return count_flops(lambda: model(pixel_values=x))


def jpeg_bytes_per_image(resolution: int = 512, quality: int = 95) -> float:
    """Mean JPEG size of natural photographs (scikit-image's RGB samples) at `resolution`: MIS images are SD's
    renders of photo captions, so photographs, not the procedural shapes, set the size."""
    import io

    from PIL import Image
    from skimage import data

    sizes = []
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        image = Image.fromarray(getattr(data, name)()).convert("RGB").resize((resolution, resolution), Image.BICUBIC)
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell())
    return sum(sizes) / len(sizes)


# ----------------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class PlanInputs:
    num_sets: int = 12_200_000     # CC12M captions kept by the 77-token filter (Sec. 4)
    checkpoints_kept: int = 3      # TrainConfig.keep_checkpoints of the paper preset
    context_images: int = 4        # sampling: preceding images (W = 4)


def storage(mis: Any, net_cfg: M2MConfig, parameters: int, inputs: PlanInputs) -> dict[str, float]:
    """Bytes per 25-image set of each asset and the checkpoints' total."""
    k = mis.images_per_set
    latent = net_cfg.in_channels * net_cfg.sample_size ** 2 * 2           # fp16
    dino = net_cfg.dino_tokens * net_cfg.dino_dim * 2                      # fp16
    image = jpeg_bytes_per_image(mis.resolution, mis.jpeg_quality) if mis.image_format == "jpeg" else \
        mis.resolution ** 2 * 3 / 2                                        # PNG of a photo: ~half the raw bytes
    return {"mis_set": k * (image + (latent if mis.keep_latents else 0)), "features_set_latents": k * latent,
            "features_set_dino": k * dino, "features_set_images": k * image,  # an online DINO store's images
            "image": image, "latent": latent, "dino_image": dino,
            "checkpoint": parameters * (4 + 4 + 8), "checkpoints": inputs.checkpoints_kept * parameters * 16}


def micro_batch(per_set: int, parameters: int, cluster: Cluster, global_batch: int) -> dict[str, int | float]:
    """The largest micro-batch that fits one GPU, and the one to use: the largest divisor of the sets each GPU
    needs per optimizer step (global batch / GPUs) that fits, so that accumulation reaches the batch exactly."""
    static = parameters * OPTIMIZER_BYTES_PER_PARAM
    free = cluster.gpu_memory_gib * 2**30 - cluster.headroom_gib * 2**30 - static
    fits = max(0, int(free // per_set))
    per_gpu = math.ceil(global_batch / cluster.gpus)
    micro = max((d for d in range(1, min(fits, per_gpu) + 1) if per_gpu % d == 0), default=0)
    accumulate = per_gpu // micro if micro else 0
    return {"static_gib": static / 2**30, "activation_gib_per_set": per_set / 2**30, "fits": fits,
            "micro_batch": micro, "grad_accum": accumulate, "global_batch": cluster.gpus * micro * accumulate}


def gpu_hours(flops: float, cluster: Cluster) -> float:
    return flops / (cluster.gpu_tflops * 1e12 * cluster.utilisation) / 3600


def training_run(train: Any, num_sets: int) -> dict[str, Any]:
    """One variant's training length (its TrainConfig after `for_variant`): the subset of the MIS sets it draws
    (Sec. 7.1.1; the rule of training.draw_subset), epochs, global batch and the steps, derived or given."""
    from m2m_pipeline.training import SUBSET_RULE

    if train.subset_sets > num_sets:
        raise ValueError(f"TrainConfig.subset_sets={train.subset_sets:,} is more than the {num_sets:,} MIS sets planned")
    return {"subset_sets": train.subset_sets or num_sets, "of_sets": num_sets,
            "rule": SUBSET_RULE if train.subset_sets else "all", "seed": train.seed, "epochs": train.epochs,
            "global_batch": train.global_batch_size, "steps": train.steps, "steps_derived": bool(train.epochs)}


def make_plan(net_preset: str, mis: Any, train: Any, cluster: Cluster, inputs: PlanInputs = PlanInputs()
              ) -> dict[str, Any]:
    """Storage, per-GPU training memory and micro-batch, FLOPs per image and GPU-hours per stage. `train` may
    hold a per-variant subset (the paper preset): each variant's steps are its own (TrainConfig.for_variant)."""
    out: dict[str, Any] = {"cluster": asdict(cluster), "inputs": asdict(inputs), "variants": {}}
    base_train = train
    sd = sd_generation_flops_per_image(mis.num_inference_steps)
    dino = dino_flops_per_image()
    sets, images = inputs.num_sets, inputs.num_sets * mis.images_per_set
    for variant in ("self", "dino"):
        train = base_train.for_variant(variant)
        cfg = M2MConfig.preset(net_preset, variant)
        prof = training_profile(cfg, train.n_images)
        per_set = prof["activation_bytes_checkpointed" if train.gradient_checkpointing else "activation_bytes"]
        sampling = sampling_flops_per_image(cfg, 50, inputs.context_images)
        if variant == "dino":  # each generated image is encoded by DINOv2 before it becomes context
            sampling = {k: v + dino for k, v in sampling.items()}
        out["variants"][variant] = {
            **prof, "train": training_run(train, sets),
            "micro_batch": micro_batch(per_set, prof["parameters"], cluster, train.global_batch_size),
            "sampling_flops_per_image": sampling,
            "train_gpu_hours": gpu_hours(train.steps * train.global_batch_size * prof["train_flops"], cluster),
            "sampling_gpu_hours_per_1000_images": gpu_hours(1000 * sampling["cached"], cluster)}
    st = storage(mis, M2MConfig.preset(net_preset), out["variants"]["dino"]["parameters"], inputs)
    stores = {"cache": st["features_set_latents"] + st["features_set_dino"],
              "online": st["features_set_latents"] + st["features_set_images"]}  # bytes per feature sample
    out["storage"] = {**st, "mis_total": sets * st["mis_set"], "features_total_latents": sets * st["features_set_latents"],
                      "features_total_dino": sets * st["features_set_dino"],
                      "features_total_images": sets * st["features_set_images"],
                      # every byte of a shard is read (and hashed); "used" counts the N images an example draws
                      "read_bytes_per_step": {m: train.global_batch_size * b for m, b in stores.items()},
                      "read_bytes_per_step_used_images": train.global_batch_size * stores["cache"] * train.n_images
                      / mis.images_per_set}
    train = base_train.for_variant("dino")  # the online DINO store serves M2M-DINO's training only
    online_flops = (train.n_images - 1) * dino  # the N - 1 context images of a set, in the training step
    out["dino_store"] = {"chosen": mis.dino_features, "online_flops_per_set": online_flops,
                         "online_fraction_of_training": online_flops / out["variants"]["dino"]["train_flops"],
                         "online_gpu_hours": gpu_hours(train.steps * train.global_batch_size * online_flops, cluster)}
    out["flops_per_image"] = {"mis_generation": sd["total"], "dino_encode": dino}
    out["gpu_hours"] = {"mis_generation": gpu_hours(images * sd["total"], cluster),
                        "dino_features": gpu_hours(images * dino, cluster)}
    return out


def _size(n: float) -> str:
    for unit, scale in (("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def format_plan(plan: dict[str, Any]) -> str:
    c, st, v, d = plan["cluster"], plan["storage"], plan["variants"], plan["dino_store"]
    lines = [f"cluster: {c['gpus']} GPUs x {c['gpu_memory_gib']:g} GiB, {c['gpu_tflops']:g} TFLOPs peak at "
             f"{100 * c['utilisation']:.0f} % utilisation; {plan['inputs']['num_sets']:,} sets of 25 images",
             "", "| storage | per set | total |", "|---|---|---|",
             f"| MIS shards (JPEG {_size(st['image'])} / image + SD latents) | {_size(st['mis_set'])} | "
             f"{_size(st['mis_total'])} |",
             f"| feature cache: latents (fp16 {_size(st['latent'])} / image) | {_size(st['features_set_latents'])} | "
             f"{_size(st['features_total_latents'])} |",
             f"| feature cache: DINO tokens, store 'cache' (fp16 {_size(st['dino_image'])} / image) | "
             f"{_size(st['features_set_dino'])} | {_size(st['features_total_dino'])} |",
             f"| feature cache: the images, store 'online' (copied from MIS) | "
             f"{_size(st['features_set_images'])} | {_size(st['features_total_images'])} |",
             f"| checkpoints (EMA + raw + AdamW, {plan['inputs']['checkpoints_kept']} kept) | "
             f"{_size(st['checkpoint'])} each | {_size(st['checkpoints'])} |",
             f"| read per optimizer step: store 'cache' / 'online' (whole samples, every byte hashed) | | "
             f"{_size(st['read_bytes_per_step']['cache'])} / {_size(st['read_bytes_per_step']['online'])} |",
             f"| DINO store chosen: {d['chosen']}; online encoding of the N - 1 context images | "
             f"{d['online_flops_per_set'] / 1e12:.2f} TFLOPs / set | {100 * d['online_fraction_of_training']:.0f} % "
             f"of M2M-DINO's training FLOPs, {d['online_gpu_hours']:,.0f} GPU-hours |",
             "", "| training (per GPU) | M2M-Self | M2M-DINO |", "|---|---|---|"]
    row = lambda label, f: lines.append(f"| {label} | {f(v['self'])} | {f(v['dino'])} |")  # noqa: E731
    row("training subset (Sec. 7.1.1: rule, seed)", lambda x: f"{x['train']['subset_sets']:,} of "
        f"{x['train']['of_sets']:,} sets ({x['train']['rule']}, seed {x['train']['seed']})")
    row("steps: ceil(subset x epochs / global batch)", lambda x: (
        f"ceil({x['train']['subset_sets']:,} x {x['train']['epochs']} / {x['train']['global_batch']}) = "
        f"{x['train']['steps']:,}" if x["train"]["steps_derived"] else f"{x['train']['steps']:,} (given)"))
    row("parameters", lambda x: f"{x['parameters'] / 1e6:.0f} M")
    row("weights + grads + AdamW + EMA", lambda x: f"{x['micro_batch']['static_gib']:.1f} GiB")
    row("activations per set (bf16, checkpointing)", lambda x: f"{x['micro_batch']['activation_gib_per_set']:.2f} GiB")
    row("largest micro-batch that fits", lambda x: f"{x['micro_batch']['fits']} sets")
    row("micro-batch x accumulation -> global", lambda x: f"{x['micro_batch']['micro_batch']} x "
        f"{x['micro_batch']['grad_accum']} -> {x['micro_batch']['global_batch']}")
    row("training TFLOPs per set (fwd + bwd + recompute)", lambda x: f"{x['train_flops'] / 1e12:.1f}")
    row("sampling TFLOPs per image (DDIM 50, CFG; cached / uncached)",
        lambda x: f"{x['sampling_flops_per_image']['cached'] / 1e12:.0f} / "
                  f"{x['sampling_flops_per_image']['uncached'] / 1e12:.0f}")
    row("GPU-hours: training", lambda x: f"{x['train_gpu_hours']:,.0f}")
    row("GPU-hours: sampling 1000 images", lambda x: f"{x['sampling_gpu_hours_per_1000_images']:.2f}")
    f, g = plan["flops_per_image"], plan["gpu_hours"]
    lines += ["", "| data stage | TFLOPs per image | GPU-hours |", "|---|---|---|",
              f"| MIS generation (SD-2.1-base, CFG, VAE decode) | {f['mis_generation'] / 1e12:.1f} | "
              f"{g['mis_generation']:,.0f} |",
              f"| DINOv2-giant features, store 'cache' only (latents reused from MIS) | {f['dino_encode'] / 1e12:.2f} | "
              f"{g['dino_features']:,.0f} |"]
    return "\n".join(lines)
