"""The learnability ablation (issue 11; docs/model.md "Ablation"): every row trains one model for the same
wall-clock budget on one core and is judged by the same protocol as the demo's learnability table —
guidance and DDIM steps chosen on the validation split, then position-1 oracle consistency on the first 64
test sets with 4 preceding images and W = 4, plus the unconditional branch.

    m2m ablation --out runs/ablation                 # all rows, two at a time (one core each), ~15 min a row

Rows whose `train` sets `steps` and `max_seconds: 0` train a fixed number of steps instead (the 2x rows).

It reads what `make demo` produced (MIS shards, latent feature caches, the autoencoder and the oracle under
assets/demo and models/demo) and builds pixel feature caches for the pixel rows itself. Not part of
`make demo`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from m2m_pipeline.io import atomic_write_text
from m2m_pipeline.network.config import NOISE_SCHEDULES


@dataclass(frozen=True)
class AblationRow:
    name: str                                              # unique, a folder name
    variant: str                                           # "self" or "dino"
    net_preset: str = "demo"                               # "demo" (latent) or "demo-pixel"
    train: dict[str, Any] = field(default_factory=dict)    # TrainConfig overrides of the demo preset
    net: dict[str, Any] = field(default_factory=dict)      # M2MConfig overrides
    note: str = ""                                         # what the row varies
    init: str = "random"                                   # "random" or "base": start from the base model (Sec. 6.1)

    @property
    def space(self) -> str:
        from m2m_pipeline.network import M2MConfig

        return "pixel" if M2MConfig.preset(self.net_preset).autoencoder == "pixel" else "latent"


# The latent demo U-Net (widths 32/64, Image-Set Attention at both levels) on patchified 32 px pixels.
_PATCH4: dict[str, Any] = {"patch_size": 4, "block_out_channels": (32, 64), "attention_head_dim": (2, 4),
                           "down_block_types": ("CrossAttnDownBlock2D",) * 2, "up_block_types": ("CrossAttnUpBlock2D",) * 2}
_PATCH2: dict[str, Any] = {"patch_size": 2, "block_out_channels": (32, 64, 64), "attention_head_dim": (2, 4, 4)}

_LINEAR: dict[str, Any] = NOISE_SCHEDULES["linear"]  # the demo preset's schedule before the base model

ROWS: tuple[AblationRow, ...] = (
    # The demo: SD's scaled-linear schedule (the demo preset's), both variants start from the base model
    # (Sec. 6.1, m2m_pipeline/base_model.py, SD-2.1-base's role); --trained takes make demo's checkpoints.
    AblationRow("latent-dino", "dino", init="base", note="the demo: starts from the base model (Sec. 6.1)"),
    AblationRow("latent-self", "self", init="base", note="the demo: starts from the base model (Sec. 6.1)"),
    # Issue 15: context-noise augmentation (M2M-Self's context noised to t_c ~ U{0..200}, the clean stream told t_c)
    AblationRow("latent-self-ctxnoise200", "self", init="base",
                train={"context_noise": 200, "steps": 2245, "max_seconds": 0.0},
                note="make demo's M2M-Self (2245 steps) + context noise t_c ~ U{0..200} in training (issue 15)"),
    # What the base model adds: the same schedule from random weights.
    AblationRow("latent-dino-sl", "dino", note="scaled-linear schedule, random init (no base model)"),
    AblationRow("latent-self-sl", "self", note="scaled-linear schedule, random init (no base model)"),
    # The demo before the base model: random init, DDPM's linear schedule. Every row below with _LINEAR varies
    # that demo ("make demo's steps": the 2664 / 1652 steps its 15 minutes gave M2M-DINO / M2M-Self).
    AblationRow("latent-dino-linear", "dino", net=_LINEAR, note="the demo before the base model: random init, linear schedule"),
    AblationRow("latent-self-linear", "self", net=_LINEAR, note="the demo before the base model: random init, linear schedule"),
    AblationRow("pixel-dino", "dino", "demo-pixel", note="32 px pixel space, the demo before the autoencoder"),
    AblationRow("pixel-self", "self", "demo-pixel", note="32 px pixel space"),
    AblationRow("latent-dino-64x128", "dino", net={**_LINEAR, "block_out_channels": (64, 128), "attention_head_dim": (4, 8)},
                note="U-Net widths 64/128 (4.2 M parameters) instead of 32/64 (1.1 M)"),
    AblationRow("latent-self-64x128", "self", net={**_LINEAR, "block_out_channels": (64, 128), "attention_head_dim": (4, 8)},
                note="U-Net widths 64/128"),
    # A fixed step count instead of the wall-clock budget (max_seconds 0): twice the steps make demo's
    # 15 minutes gave each variant, so the row answers "does more training reach shape?" whatever the load.
    AblationRow("latent-dino-2x-steps", "dino", net=_LINEAR, train={"steps": 5328, "max_seconds": 0.0},
                note="2x make demo's steps (5328 instead of 2664), no time limit"),
    AblationRow("latent-self-2x-steps", "self", net=_LINEAR, train={"steps": 3304, "max_seconds": 0.0},
                note="2x make demo's steps (3304 instead of 1652), no time limit"),
    # The demo's step counts with the learning rate annealed to 0 by a cosine (100 warm-up steps) instead of constant.
    AblationRow("latent-dino-cosine", "dino", net=_LINEAR, train={"steps": 2664, "max_seconds": 0.0, "lr_scheduler": "cosine",
                                                      "lr_warmup_steps": 100},
                note="make demo's 2664 steps, cosine learning-rate decay to 0"),
    AblationRow("latent-self-cosine", "self", net=_LINEAR, train={"steps": 1652, "max_seconds": 0.0, "lr_scheduler": "cosine",
                                                      "lr_warmup_steps": 100},
                note="make demo's 1652 steps, cosine learning-rate decay to 0"),
    AblationRow("latent-dino-batch24", "dino", net=_LINEAR, train={"batch_size": 24}, note="twice the batch, half the steps"),
    AblationRow("latent-dino-batch6", "dino", net=_LINEAR, train={"batch_size": 6}, note="half the batch, ~twice the steps"),
    AblationRow("latent-dino-lr3e-4", "dino", net=_LINEAR, train={"lr": 3e-4}, note="lower learning rate"),
    AblationRow("latent-dino-eps", "dino", net={**_LINEAR, "prediction_type": "epsilon"}, note="eps instead of v prediction"),
    AblationRow("latent-self-n3", "self", net=_LINEAR, train={"n_images": 3}, note="N = 3 images per example (paper: 5)"),
    # The cheapest latent: 32 px pixels cut into 4x4 patches (space-to-depth, 8x8x48), the latent demo's U-Net
    # on the same 8x8 grid. Tests whether the learned autoencoder's code is what keeps the U-Net from drawing
    # outlines (shape_diagnostic: generated images read "square" 67-78 %).
    # make demo's step counts (fixed: the U-Net costs the same on the same grid, so the rows compare at equal steps).
    AblationRow("patch4-dino", "dino", "demo-pixel", net=_PATCH4, train={"steps": 2664, "max_seconds": 0.0},
                note="pixels in 4x4 patches (8x8x48), no autoencoder; make demo's 2664 steps"),
    AblationRow("patch4-self", "self", "demo-pixel", net=_PATCH4, train={"steps": 1652, "max_seconds": 0.0},
                note="pixels in 4x4 patches (8x8x48); make demo's 1652 steps"),
    # 2x2 patches (16x16x12): the U-Net draws on a grid twice as fine, levels 16/8/4, Image-Set Attention at 8 and 4.
    AblationRow("patch2-dino", "dino", "demo-pixel", net=_PATCH2, note="pixels in 2x2 patches (16x16x12), 15 minutes"),
    AblationRow("patch2-self", "self", "demo-pixel", net=_PATCH2, note="pixels in 2x2 patches (16x16x12), 15 minutes"),
    AblationRow("latent-dino-minsnr5", "dino", net=_LINEAR, train={"snr_gamma": 5.0}, note="Min-SNR-5 loss weighting, 15 minutes"),
    AblationRow("latent-dino-minsnr5-2664", "dino", net=_LINEAR, train={"snr_gamma": 5.0, "steps": 2664, "max_seconds": 0.0},
                note="Min-SNR-5 loss weighting, make demo's 2664 steps"),
    AblationRow("latent-dino-minsnr5-2x-steps", "dino", net=_LINEAR, train={"snr_gamma": 5.0, "steps": 5328, "max_seconds": 0.0},
                note="Min-SNR-5 loss weighting, 2x make demo's steps (5328)"),
    AblationRow("latent-self-minsnr5", "self", net=_LINEAR, train={"snr_gamma": 5.0}, note="Min-SNR-5 loss weighting"),
    AblationRow("latent-self-minsnr5-1652", "self", net=_LINEAR, train={"snr_gamma": 5.0, "steps": 1652, "max_seconds": 0.0},
                note="Min-SNR-5 loss weighting, make demo's 1652 steps"),
)
ROWS_BY_NAME = {r.name: r for r in ROWS}


@dataclass(frozen=True)
class AblationInputs:
    mis_dir: Path            # <split>/mis-*.tar (assets/demo/mis)
    latent_features: Path    # <split>/mis-*.tar built with the autoencoder (assets/demo/features)
    autoencoder: Path        # folder with vae/ (models/demo/autoencoder)
    oracle: Path             # models/demo/oracle
    base_model: Path         # models/demo/base_model: the SD-style folder the "base" rows start from
    out: Path                # rows land in out/<name>/, pixel features in out/pixel_features/

    @classmethod
    def from_demo(cls, root: Path, out: Path) -> AblationInputs:
        return cls(root / "assets/demo/mis", root / "assets/demo/features", root / "models/demo/autoencoder",
                   root / "models/demo/oracle", root / "models/demo/base_model", out)

    def features(self, space: str) -> Path:
        return self.latent_features if space == "latent" else self.out / "pixel_features"


def build_pixel_features(inputs: AblationInputs, progress: bool = True) -> Path:
    """Feature shards of the demo's MIS with the identity autoencoder (pixels) and the same DINO encoder."""
    from m2m_pipeline.data import build_feature_shards, get_preset
    from m2m_pipeline.data.captions import SPLITS

    cfg = get_preset("demo").replace(autoencoder="pixel", autoencoder_path=None)
    for split in SPLITS:
        build_feature_shards(inputs.mis_dir / split, inputs.features("pixel") / split, cfg, progress=progress)
    return inputs.features("pixel")


def train_row(row: AblationRow, inputs: AblationInputs, seconds: float) -> dict[str, Any]:
    """Train one row for `seconds` of wall-clock time (the caller sets the thread count)."""
    from m2m_pipeline.network import M2MConfig
    from m2m_pipeline.training import TrainConfig, initial_network, train

    net_cfg = M2MConfig.preset(row.net_preset, row.variant, **row.net)
    tc = TrainConfig.preset("demo", **{"checkpoint_every": 0, "max_seconds": seconds, **row.train})
    shards = sorted(str(s) for s in (inputs.features(row.space) / "train").glob("mis-*.tar"))
    net = initial_network(inputs.base_model if row.init == "base" else None, net_cfg)
    result = train(net_cfg, tc, shards, inputs.out / row.name, net=net, progress=False)
    return {"steps": result.steps, "seconds": result.seconds, "final_loss": result.final_loss}


def reuse_trained(row: AblationRow, checkpoint: Path, seconds: float) -> dict[str, Any]:
    """The training record of a checkpoint trained elsewhere with exactly this row's configuration (make demo's
    M2M-DINO / M2M-Self are the latent-dino / latent-self rows): refused unless its network config and its
    training config, budget included, are the row's."""
    from m2m_pipeline.checkpointing import read_state
    from m2m_pipeline.network import M2MConfig, M2MUNet
    from m2m_pipeline.training import TrainConfig

    state_path = checkpoint / "train_state.json"
    if not state_path.is_file():
        raise ValueError(f"{checkpoint}: no train_state.json, not a training checkpoint")
    state = read_state(checkpoint)  # the checkpoint's own size-capped, validated reader
    want_net = M2MConfig.preset(row.net_preset, row.variant, **row.net)
    want_train = TrainConfig.preset("demo", **{"max_seconds": seconds, **row.train})
    got_train = TrainConfig(**state["train_config"])
    ignored = ("checkpoint_every", "keep_checkpoints", "log_every", "num_workers")  # no effect on the weights
    same = lambda tc: dataclasses.replace(tc, **{k: getattr(want_train, k) for k in ignored})  # noqa: E731
    if M2MUNet.read_config(checkpoint) != want_net or same(got_train) != want_train:
        raise ValueError(f"{checkpoint} was not trained with row {row.name}'s configuration "
                         f"(network {row.net_preset} {row.variant} {row.net}, training demo {row.train}, "
                         f"max_seconds {seconds:g})")
    return {"steps": state["step"], "seconds": state["seconds"], "final_loss": state["losses"][-1],
            "checkpoint": str(checkpoint)}


def evaluate_row(row: AblationRow, inputs: AblationInputs, sweep: Any = None, test_sets: int = 64,
                 seed: int = 0, checkpoint: Path | None = None) -> dict[str, Any]:
    """The demo's learnability protocol on one trained row (see the module docstring)."""
    from m2m_pipeline.bundle import load_bundle
    from m2m_pipeline.evaluation.learnability import SamplingSweep, choose_sampling, position1_consistency
    from m2m_pipeline.evaluation.oracle import AttributeOracle
    from m2m_pipeline.evaluation.protocol import load_test_sets

    bundle = load_bundle(checkpoint or inputs.out / row.name / "final",  # the encoders it was trained with
                         vae=inputs.autoencoder if row.space == "latent" else None)
    net, ae, encoder = bundle.net, bundle.autoencoder, bundle.context_encoder
    oracle = AttributeOracle.load(inputs.oracle)
    feats = inputs.features(row.space)
    load = lambda split, n: load_test_sets(sorted(str(s) for s in (feats / split).glob("mis-*.tar")), n, 4)
    sweep = sweep or SamplingSweep()
    best, rows = choose_sampling(net, ae, load("validation", sweep.num_sets), oracle, sweep, context_images=4,
                                 window=4, seed=seed, context_encoder=encoder)
    test = load("test", test_sets)
    common = dict(context_images=4, steps=best["steps"], window=4, seed=seed, context_encoder=encoder)
    guided = position1_consistency(net, ae, test, oracle, guidance_scale=best["guidance_scale"], **common)
    uncond = position1_consistency(net, ae, test, oracle, guidance_scale=1.0, unconditional=True, **common)
    return {"chosen": {"guidance_scale": best["guidance_scale"], "steps": best["steps"]}, "validation": rows,
            "test": guided, "unconditional": uncond, "test_sets": len(test.keys)}


def run_row(name: str, inputs: AblationInputs, seconds: float, trained: Path | None = None) -> dict[str, Any]:
    """Train (or take `trained`, see reuse_trained) and evaluate one row; its record goes to
    out/<name>/ablation.json."""
    row = ROWS_BY_NAME[name]
    start = time.perf_counter()
    train_record = reuse_trained(row, trained, seconds) if trained else train_row(row, inputs, seconds)
    record = {"row": dataclasses.asdict(row), "space": row.space, "train": train_record}
    record["eval"] = evaluate_row(row, inputs, checkpoint=trained)
    record["wall_seconds"] = round(time.perf_counter() - start, 1)
    atomic_write_text(inputs.out / name / "ablation.json", [json.dumps(record, indent=1, default=str)])
    return record


def run_all(names: list[str], inputs: AblationInputs, seconds: float, parallel: int = 2,
            trained: dict[str, Path] | None = None) -> str:
    """Each row in its own process with one torch thread, `parallel` at a time (make demo's layout: one core
    per training); rows in `trained` are evaluated from that checkpoint instead; then the table."""
    trained = trained or {}
    if any(ROWS_BY_NAME[n].space == "pixel" for n in names):
        build_pixel_features(inputs)
    pending, running = list(names), []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    while pending or running:
        while pending and len(running) < parallel:
            name = pending.pop(0)
            cmd = [sys.executable, "-m", "m2m_pipeline.cli", "ablation", "--row", name, "--out", str(inputs.out),
                   "--seconds", str(seconds), "--threads", "1", "--root", str(inputs.mis_dir.parents[2])]
            if name in trained:
                cmd += ["--trained", f"{name}={trained[name]}"]
            log = open(inputs.out / f"{name}.log", "w")  # noqa: SIM115 - closed when the process ends
            running.append((name, subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log))
        for item in list(running):
            name, proc, log = item
            if proc.poll() is not None:
                log.close()
                running.remove(item)
                if proc.returncode != 0:
                    raise RuntimeError(f"ablation row {name} failed (exit {proc.returncode}); see "
                                       f"{inputs.out / (name + '.log')}")
        time.sleep(5)
    return write_table(names, inputs.out)



def write_table(names: list[str], out: Path) -> str:
    """Markdown table of the rows' records (out/<name>/ablation.json) -> out/ablation.md."""
    lines = ["| row | what varies | steps (minutes) | colour | background | shape | unconditional c / b / s | "
             "chosen (s, DDIM steps) |", "|---|---|---|---|---|---|---|---|"]
    for name in names:
        rec = json.loads((out / name / "ablation.json").read_text())
        t, u, c = rec["eval"]["test"], rec["eval"]["unconditional"], rec["eval"]["chosen"]
        lines.append(f"| {name} | {rec['row']['note']} | {rec['train']['steps']} "
                     f"({rec['train']['seconds'] / 60:.1f}) | {t['colour']:.2f} | "
                     f"{t['background']:.2f} | {t['shape']:.2f} | {u['colour']:.2f} / {u['background']:.2f} / "
                     f"{u['shape']:.2f} | {c['guidance_scale']:g}, {c['steps']} |")
    table = "\n".join(lines) + "\n"
    atomic_write_text(out / "ablation.md", [table])
    return table
