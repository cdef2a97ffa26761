"""Sampling speed per generated image (Fig. 9): SD baseline vs M2M-DINO vs M2M-Self (cached / uncached).

All models share one preset's U-Net dimensions and are measured in one process, interleaved, with DDIM,
classifier-free guidance (both branches in one batch) and the same number of steps. The SD baseline is the
same U-Net with its text cross-attention and a 77-token text context, which is what SD's pipeline runs per
step. Timing does not depend on weight values, so freshly initialised networks are as good as trained ones
(a trained checkpoint of the same preset can be passed in instead). Used by `benchmarks/bench_sampling.py`
and the `sampling_benchmark` Dagster asset.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from m2m_pipeline.encoders import DinoEncoder, PixelAutoencoder
from m2m_pipeline.network import M2MConfig, M2MUNet
from m2m_pipeline.sampling import classifier_free_guidance, generate, make_ddim

METHODS = ("sd", "dino", "self_cached", "self_uncached")
LABELS = {"sd": "SD baseline (text)", "dino": "M2M-DINO", "self_cached": "M2M-Self, KV cache",
          "self_uncached": "M2M-Self, no cache"}


@dataclass(frozen=True)
class SpeedRow:
    method: str          # one of METHODS
    context: int         # preceding images (0 for the SD baseline, which has none)
    seconds_per_image: float
    ratio_to_sd: float   # seconds_per_image / the SD baseline's, measured in the same run


@torch.no_grad()
def sd_baseline(unet: UNet2DConditionModel, cfg: M2MConfig, num_images: int, steps: int, guidance: float,
                device: torch.device) -> None:
    """Text-to-image sampling with the plain U-Net: 77 text tokens, CFG, DDIM (what SD's pipeline does)."""
    text = torch.randn(2, 77, cfg.cross_attention_dim, device=device)  # [uncond; cond] prompt embeddings
    scheduler = make_ddim(cfg, steps)
    for _ in range(num_images):
        z = torch.randn(1, cfg.in_channels, cfg.sample_size, cfg.sample_size, device=device)
        for t in scheduler.timesteps:
            eps = unet(torch.cat([z, z]), t, encoder_hidden_states=text).sample
            u, c = eps.chunk(2)
            z = scheduler.step(classifier_free_guidance(u, c, guidance), t, z).prev_sample


def timed_round_robin(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each function, measured interleaved (one call of each per round) so that drift in
    machine load hits every configuration alike; one untimed warm-up call each first."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up: allocator growth, thread-pool start, kernel selection
    for _ in range(repeats):
        for name, fn in fns.items():
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _dino_encoder(preset: str, cfg: M2MConfig, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """The DINO pass over each generated image is part of M2M-DINO's cost."""
    if cfg.dino_dim == M2MConfig().dino_dim:  # the paper's width: dinov2-giant's shape at 224 px
        from transformers import Dinov2Config, Dinov2Model

        # random weights; a VAE decode would add the same cost to every row: left out.
        dino = DinoEncoder(Dinov2Model(Dinov2Config(hidden_size=cfg.dino_dim, num_hidden_layers=40,
                                                    num_attention_heads=24, intermediate_size=4 * cfg.dino_dim,
                                                    patch_size=14, image_size=224)),
                           image_size=224, resize_size=256).to(device)
        return lambda z: dino.encode(torch.rand(z.shape[0], 3, 224, 224, device=z.device) * 2 - 1)
    dino = DinoEncoder.random(image_size=cfg.image_size, hidden_size=cfg.dino_dim, seed=0).to(device)
    if cfg.autoencoder == "vae":  # a CPU latent preset: random pixels stand in for the decode (see above)
        size = cfg.image_size
        return lambda z: dino.encode(torch.rand(z.shape[0], 3, size, size, device=z.device) * 2 - 1)
    decode = PixelAutoencoder().decode
    return lambda z: dino.encode(decode(z))


def measure_sampling_speed(preset: str, contexts: Sequence[int] = (1, 2, 4, 8), *, steps: int = 50,
                           generated: int = 2, repeats: int = 3, guidance: float = 7.5,
                           device: str | torch.device | None = None,
                           nets: dict[str, M2MUNet] | None = None) -> list[SpeedRow]:
    """Seconds per generated image for every method and context size, with ratios to the SD baseline.

    nets: {"self": ..., "dino": ...} trained models of `preset`'s dimensions (default: fresh ones).
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    cfg = M2MConfig.preset(preset)
    sd = UNet2DConditionModel(**cfg.unet_kwargs()).to(device).eval()
    nets = dict(nets or {})
    for variant in ("self", "dino"):
        nets.setdefault(variant, M2MUNet(M2MConfig.preset(preset, variant)))
        nets[variant] = nets[variant].to(device).eval()
    dino_of = _dino_encoder(preset, cfg, device)
    k = generated

    fns: dict[str, Callable[[], object]] = {"sd/0": lambda: sd_baseline(sd, cfg, k, steps, guidance, device)}
    for n in contexts:
        ctx = torch.randn(1, n, cfg.in_channels, cfg.sample_size, cfg.sample_size, device=device)
        common = {"steps": steps, "guidance_scale": guidance, "window": n, "progress": False}
        fns[f"dino/{n}"] = lambda ctx=ctx, c=common: generate(nets["dino"], ctx, k, context_encoder=dino_of, **c)
        fns[f"self_cached/{n}"] = lambda ctx=ctx, c=common: generate(nets["self"], ctx, k, use_cache=True, **c)
        fns[f"self_uncached/{n}"] = lambda ctx=ctx, c=common: generate(nets["self"], ctx, k, use_cache=False, **c)
    seconds = {name: s / k for name, s in timed_round_robin(fns, repeats).items()}
    sd_time = seconds["sd/0"]
    rows = []
    for name, s in seconds.items():
        method, n = name.split("/")
        rows.append(SpeedRow(method, int(n), s, s / sd_time))
    return rows


def format_table(rows: Sequence[SpeedRow]) -> str:
    sd = next(r for r in rows if r.method == "sd")
    by = {(r.method, r.context): r for r in rows}
    contexts = sorted({r.context for r in rows if r.method != "sd"})
    lines = [f"seconds per generated image (SD baseline, text-to-image: {sd.seconds_per_image:.3f} s)",
             (f"{'context':>7} | {'SD':>7} | {'DINO':>7} | {'Self cached':>11} | {'Self uncached':>13} | "
             f"{'DINO/SD':>7} | {'SelfC/SD':>8} | {'SelfU/SD':>8}")]
    for n in contexts:
        d, c, u = by[("dino", n)], by[("self_cached", n)], by[("self_uncached", n)]
        lines.append(f"{n:>7} | {sd.seconds_per_image:7.3f} | {d.seconds_per_image:7.3f} | "
                     f"{c.seconds_per_image:11.3f} | {u.seconds_per_image:13.3f} | {d.ratio_to_sd:7.2f} | "
                     f"{c.ratio_to_sd:8.2f} | {u.ratio_to_sd:8.2f}")
    return "\n".join(lines)


def plot_speed(rows: Sequence[SpeedRow], path: str | Path, title: str = "Sampling time per image (Fig. 9)") -> Path:
    """Fig. 9: seconds per generated image vs number of context images; SD as a horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=110)
    sd = next(r for r in rows if r.method == "sd")
    ax.axhline(sd.seconds_per_image, color="k", ls="--", lw=1, label=LABELS["sd"])
    for method in METHODS[1:]:
        pts = sorted((r.context, r.seconds_per_image) for r in rows if r.method == method)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", lw=1.2, label=LABELS[method])
    ax.set(xlabel="context images", ylabel="seconds / image", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    from m2m_pipeline.evaluation.figures import save_figure

    return save_figure(fig, path)


def rows_to_dicts(rows: Sequence[SpeedRow]) -> list[dict]:
    return [asdict(r) for r in rows]


# ---------------------------------------------------------------------- training throughput
class PlainUNet(torch.nn.Module):
    """The baseline of the training benchmark: the same diffusers U-Net without Image-Set Attention (every
    transformer block's cross-attention removed), called with M2M's signature so one objective trains all."""

    def __init__(self, cfg: M2MConfig):
        super().__init__()
        from diffusers.models.attention import BasicTransformerBlock

        self.config = cfg
        self.unet = UNet2DConditionModel(**cfg.unet_kwargs())
        for block in self.unet.modules():
            if isinstance(block, BasicTransformerBlock):
                block.attn2, block.norm2 = None, None  # diffusers skips the cross-attention sub-layer then

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None, task_cond=None,
                **_: object) -> torch.Tensor:
        b, n = z_t.shape[:2]
        eps = self.unet(z_t.flatten(0, 1), t.flatten(), encoder_hidden_states=None).sample
        return eps.unflatten(0, (b, n))


@dataclass(frozen=True)
class TrainingRow:
    method: str                # "baseline" (plain U-Net), "dino", "self"
    parameters: int
    seconds_per_step: float    # one optimizer step: forward + backward + AdamW (+ M2M-Self's clean stream)
    images_per_second: float   # noisy training images (batch x N) per second
    ratio_to_baseline: float   # seconds_per_step / the baseline's, measured in the same run


TRAINING_METHODS = ("baseline", "dino", "dino-online", "self")


def online_dino_encoder(preset: str) -> tuple[DinoEncoder, int]:
    """The DINO encoder an online store of `preset` runs in the training step, and its input resolution: the
    MIS preset's random stand-in, or (a preset naming a DINOv2 folder) random weights of DINOv2-giant's shape."""
    from m2m_pipeline.data.config import MIS_PRESETS
    from m2m_pipeline.data.features import encoder_spec

    mis = MIS_PRESETS.get(preset, MIS_PRESETS["tiny"])
    if mis.dino_path is None:
        return encoder_spec(mis).build_dino(), mis.resolution
    from transformers import Dinov2Config, Dinov2Model

    from m2m_pipeline.reference_layouts import DINOV2_GIANT, DINOV2_PROCESSOR

    crop = DINOV2_PROCESSOR["crop_size"]["height"]
    model = Dinov2Model(Dinov2Config(**DINOV2_GIANT))
    return DinoEncoder(model, image_size=crop, resize_size=DINOV2_PROCESSOR["size"]["shortest_edge"]), mis.resolution


def training_step_fns(preset: str, batch_size: int, n_images: int, device: torch.device,
                      methods: Sequence[str] = TRAINING_METHODS, gradient_checkpointing: bool = False
                      ) -> dict[str, tuple[torch.nn.Module, Callable[[], object]]]:
    """One optimizer step per call for the plain U-Net, M2M-DINO and M2M-Self (or `methods` of them) on fixed
    random batches."""
    from m2m_pipeline.objective import M2MObjective
    from m2m_pipeline.training import context_of

    cfg = M2MConfig.preset(preset)
    z = torch.randn(batch_size, n_images, cfg.in_channels, cfg.sample_size, cfg.sample_size, device=device)
    dino = torch.randn(batch_size, n_images, cfg.dino_tokens, cfg.dino_dim, device=device)
    build = {"baseline": lambda: PlainUNet(cfg), "dino": lambda: M2MUNet(M2MConfig.preset(preset, "dino")),
             "self": lambda: M2MUNet(M2MConfig.preset(preset, "self"))}
    build["dino-online"] = build["dino"]
    out = {}
    for name in methods:
        net = build[name]().to(device).train()
        if gradient_checkpointing:
            net.unet.enable_gradient_checkpointing()
        objective = M2MObjective(net.config)
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
        generator = torch.Generator().manual_seed(0)
        if name == "dino-online":  # M2M-DINO with its DINO forward on the N - 1 context images (online store)
            encoder, size = online_dino_encoder(preset)
            encoder = encoder.to(device)
            images = torch.rand(batch_size, max(1, n_images - 1), 3, size, size, device=device) * 2 - 1
            context = lambda images=images, encoder=encoder: context_of(  # noqa: E731
                {"images": images}, "dino", encoder, device)
        else:
            context = (lambda: dino) if name == "dino" else (lambda: z)

        def step(net=net, objective=objective, optimizer=optimizer, context=context, generator=generator):
            loss = objective(net, z, context(), generator=generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        out[name] = (net, step)
    return out


def measure_training_throughput(preset: str, *, batch_size: int, n_images: int, repeats: int = 5,
                                device: str | torch.device | None = None) -> list[TrainingRow]:
    """Seconds per training step and noisy images per second, interleaved in one run, with ratios to the
    plain U-Net of the same size (what Image-Set Attention and M2M-Self's clean stream cost)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    fns = training_step_fns(preset, batch_size, n_images, device)
    seconds = timed_round_robin({name: step for name, (_, step) in fns.items()}, repeats)
    base = seconds["baseline"]
    return [TrainingRow(name, sum(p.numel() for p in net.parameters()), seconds[name],
                        batch_size * n_images / seconds[name], seconds[name] / base)
            for name, (net, _) in fns.items()]


def format_training_table(rows: Sequence[TrainingRow]) -> str:
    lines = [f"{'method':>11} | {'params':>8} | {'s / step':>8} | {'images / s':>10} | {'ratio to baseline':>17}"]
    for r in rows:
        lines.append(f"{r.method:>11} | {r.parameters / 1e6:7.2f}M | {r.seconds_per_step:8.3f} | "
                     f"{r.images_per_second:10.1f} | {r.ratio_to_baseline:17.2f}")
    return "\n".join(lines)
