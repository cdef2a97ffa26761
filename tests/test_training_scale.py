"""Training at scale: exact resume, checkpoints, EMA, accumulation, time budget, gradient checkpointing."""

from __future__ import annotations

import dataclasses
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset
from m2m_pipeline.training_stats import curves_agree

from m2m_pipeline import checkpointing as ckpt
from m2m_pipeline.data.loader import collate_examples
from m2m_pipeline.data.shards import write_manifest
from m2m_pipeline.network import M2MConfig, M2MUNet
from m2m_pipeline.training import TrainConfig, train

# eps target: in 60 steps its loss falls far enough that a frozen run is told apart (the v target of the tiny
# preset falls more slowly at this size); these tests are about the training machinery, not the target.
MICRO = M2MConfig.preset("tiny", image_size=8, sample_size=8, block_out_channels=(8, 16), norm_num_groups=4,
                         prediction_type="epsilon")


def micro_config(**overrides) -> TrainConfig:
    base = {"steps": 25, "batch_size": 2, "n_images": 2, "lr": 1e-3, "checkpoint_every": 5, "log_every": 1}
    return TrainConfig.preset("tiny", **{**base, **overrides})


class ColourSets(Dataset):
    """Map-style sets whose images share a colour (learnable), like the task datasets; `set_epoch` varies them."""

    def __init__(self, num: int = 12, n: int = 2, size: int = 8):
        g = torch.Generator().manual_seed(0)
        colour = torch.rand(num, 1, 3, 1, 1, generator=g) * 2 - 1
        self.latents = (colour + 0.1 * torch.randn(num, n, 3, size, size, generator=g)).clamp(-1, 1)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, i: int) -> dict:
        flip = (self.epoch + i) % 2 == 1  # epoch-dependent view, so a wrong epoch on resume would show
        return {"latents": self.latents[i].flip(-1) if flip else self.latents[i], "key": f"set-{i}"}


def list_data(num: int = 6):
    g = torch.Generator().manual_seed(1)
    return [{"latents": torch.randn(2, 2, 3, 8, 8, generator=g).clamp(-1, 1), "key": [f"s{i}a", f"s{i}b"]}
            for i in range(num)]


def write_feature_shards(root: Path, shards: int = 2, sets: int | list[int] = 5) -> list[str]:
    """Feature shards in the loader's format (latents.npy (K, C, H, W), dino.npy (K, S, D)), each with the manifest
    the loader verifies it against; `sets` per shard, or a list of per-shard counts (then `shards` is its length)."""
    sizes = list(sets) if isinstance(sets, list) else [sets] * shards
    g = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    urls = []
    for s, count in enumerate(sizes):
        url = root / f"mis-{s:06d}.tar"
        with tarfile.open(url, "w") as tar:
            for i in range(count):
                for ext, arr in (("latents.npy", g.standard_normal((4, 3, 8, 8)).astype(np.float16)),
                                 ("dino.npy", g.standard_normal((4, 5, 32)).astype(np.float16))):
                    buf = io.BytesIO()
                    np.save(buf, arr)
                    info = tarfile.TarInfo(f"{s:02d}{i:04d}.{ext}")
                    info.size = buf.tell()
                    buf.seek(0)
                    tar.addfile(info, buf)
        write_manifest(url, s, [f"{s:02d}{i:04d}" for i in range(count)], "test", {"kind": "features"})
        urls.append(str(url))
    return urls


def make_data(kind: str, root: Path):
    if kind == "list":
        return list_data()
    if kind == "map":
        return DataLoader(ColourSets(), batch_size=2, shuffle=True, collate_fn=collate_examples, drop_last=True)
    return write_feature_shards(root)


class Killed(Exception):
    pass


def kill_at(step_to_die: int):
    def on_metrics(metrics, step):
        if step == step_to_die:
            raise Killed(step)
    return on_metrics


@pytest.mark.parametrize("kind", ["list", "map", "shards"])
def test_resume_after_kill_continues_with_identical_losses(tmp_path, kind):
    """Killed after the step-5 checkpoint (at step 8), resumed from "latest": steps 6..25 match bit for bit."""
    data = make_data(kind, tmp_path)
    tc = micro_config()
    full = train(MICRO, tc, data, tmp_path / "full", progress=False, device="cpu")
    with pytest.raises(Killed):
        train(MICRO, tc, data, tmp_path / "killed", progress=False, device="cpu", on_metrics=kill_at(8))
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path / "killed")] == ["checkpoint-0000005"]
    resumed = train(MICRO, tc, data, tmp_path / "killed", progress=False, device="cpu", resume_from="latest")
    assert resumed.resumed_from == tmp_path / "killed" / "checkpoint-0000005"
    assert len(resumed.losses) == 25 and resumed.losses[:5] == full.losses[:5]
    assert resumed.losses[5:] == full.losses[5:]  # the next 20 steps, exactly (fp32, CPU)
    for sub in (".", "raw"):
        a = M2MUNet.from_pretrained(full.checkpoint_dir / sub).state_dict()
        b = M2MUNet.from_pretrained(resumed.checkpoint_dir / sub).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), sub


def test_resume_is_not_vacuous(tmp_path):
    """A resume that lost the optimizer state would differ: the comparison above can fail."""
    tc = micro_config(steps=10)
    full = train(MICRO, tc, list_data(), tmp_path / "full", progress=False, device="cpu")
    start = tmp_path / "full" / "checkpoint-0000005"
    training = ckpt.CheckpointReader(start).state_pair(ckpt.TRAINING_STATE)
    fresh = torch.optim.AdamW(M2MUNet(MICRO).parameters()).state_dict()
    ckpt.write_state_pair(start, ckpt.TRAINING_STATE, {**training, "optimizer": fresh})
    ckpt.write_state(start, ckpt.read_state(start))  # re-records the hashes of the replaced files
    resumed = train(MICRO, tc, list_data(), tmp_path / "other", progress=False, device="cpu", resume_from=start)
    assert resumed.losses[:5] == full.losses[:5] and resumed.losses[5:] != full.losses[5:]


def test_checkpoint_holds_ema_and_raw_weights(tmp_path):
    result = train(MICRO, micro_config(steps=6, checkpoint_every=3), list_data(), tmp_path, progress=False,
                   device="cpu")
    c = tmp_path / "checkpoint-0000003"
    names = {p.relative_to(c).as_posix() for p in c.rglob("*")}
    assert names == {"config.json", "model.safetensors", "raw", "raw/config.json", "raw/model.safetensors",
                     "training_state.safetensors", "training_state.json", "rank_state_0.safetensors",
                     "rank_state_0.json", "train_state.json"}  # no pickle: safetensors + JSON only
    state = json.loads((c / "train_state.json").read_text())
    assert state["step"] == 3 and state["data_position"] == {"epoch": 0, "consumed": 3}
    assert state["inference_weights"] == "ema" and state["global_batch_size"] == 2
    assert set(state["files"]) == names - {"raw", "train_state.json"}  # every other file's size and sha256
    training = ckpt.CheckpointReader(tmp_path / "checkpoint-0000006").state_pair(ckpt.TRAINING_STATE)
    assert training["ema"]["optimization_step"] == 6 and training["lr_scheduler"]["last_epoch"] == 6
    assert len(training["optimizer"]["state"]) == len(list(M2MUNet(MICRO).parameters()))
    ema = M2MUNet.from_pretrained(result.checkpoint_dir)      # final/: EMA weights
    raw = M2MUNet.from_pretrained(result.checkpoint_dir / "raw")
    assert any(not torch.equal(a, b) for a, b in zip(ema.parameters(), raw.parameters()))
    no_ema = train(MICRO, micro_config(steps=3, use_ema=False), list_data(), tmp_path / "no_ema", progress=False,
                   device="cpu")
    a, b = M2MUNet.from_pretrained(no_ema.checkpoint_dir), M2MUNet.from_pretrained(no_ema.checkpoint_dir / "raw")
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_latest_skips_incomplete_and_old_ones_are_pruned(tmp_path):
    train(MICRO, micro_config(steps=8, checkpoint_every=2, keep_checkpoints=2), list_data(), tmp_path,
          progress=False, device="cpu")
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path)] == ["checkpoint-0000006", "checkpoint-0000008"]
    (tmp_path / "checkpoint-0000009").mkdir()              # killed before train_state.json was written
    (tmp_path / ".checkpoint-0000010.tmp").mkdir()          # killed mid-save
    assert ckpt.resolve_resume("latest", tmp_path) == tmp_path / "checkpoint-0000008"
    assert ckpt.resolve_resume("latest", tmp_path / "empty") is None
    with pytest.raises(ValueError, match="weights only|not a complete"):
        train(MICRO, micro_config(steps=9), list_data(), tmp_path, progress=False, device="cpu",
              resume_from=tmp_path / "final")
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        ckpt.resolve_resume(tmp_path / "nope", tmp_path)


def test_time_budget_stops_cleanly_and_resumes(tmp_path):
    result = train(MICRO, micro_config(steps=200), list_data(), tmp_path, progress=False, device="cpu",
                   max_seconds=1e-6)
    assert result.stopped_early and result.steps == 1 and len(result.losses) == 1
    assert M2MUNet.from_pretrained(result.checkpoint_dir).config == MICRO
    assert ckpt.complete_checkpoints(tmp_path)[-1].name == "checkpoint-0000001"
    more = train(MICRO, micro_config(steps=3), list_data(), tmp_path, progress=False, device="cpu",
                 resume_from="latest")
    assert more.steps == 3 and not more.stopped_early and more.losses[0] == result.losses[0]


def test_resume_into_a_different_network_is_refused_naming_the_field(tmp_path):
    train(MICRO, micro_config(steps=200), list_data(), tmp_path, progress=False, device="cpu", max_seconds=1e-6)
    other = dataclasses.replace(MICRO, spatial_bias=True)  # a network with more parameters
    with pytest.raises(ValueError, match=r"checkpoint-0000001/config.json.*spatial_bias \(saved False, now True\)"):
        train(other, micro_config(steps=3), list_data(), tmp_path, progress=False, device="cpu", resume_from="latest")


@pytest.mark.slow
def test_gradient_accumulation_matches_the_larger_batch(tmp_path):
    """accum 2 x batch 2 and batch 4 (global batch 4 both): loss curves agree statistically."""
    data4 = DataLoader(ColourSets(24), batch_size=4, shuffle=True, collate_fn=collate_examples, drop_last=True)
    data2 = DataLoader(ColourSets(24), batch_size=2, shuffle=True, collate_fn=collate_examples, drop_last=True)
    big = train(MICRO, micro_config(steps=60, batch_size=4, checkpoint_every=0), data4, tmp_path / "b4",
                progress=False, device="cpu")
    accum = train(MICRO, micro_config(steps=60, batch_size=2, grad_accum=2, checkpoint_every=0), data2,
                  tmp_path / "a2", progress=False, device="cpu")
    assert json.loads((tmp_path / "a2" / "final" / "train_state.json").read_text())["global_batch_size"] == 4
    ok, report = curves_agree(big.losses, accum.losses, window=15)
    assert ok, report
    frozen = train(MICRO, micro_config(steps=60, batch_size=4, lr=1e-9, checkpoint_every=0), data4,
                   tmp_path / "frozen", progress=False, device="cpu")
    assert not curves_agree(big.losses, frozen.losses, window=15)[0]  # the comparison can tell training apart


def test_global_batch_size_derives_accumulation():
    tc = TrainConfig.preset("paper")
    assert (tc.accumulation(8), tc.accumulation(1), tc.global_batch(2)) == (4, 32, 256)  # 8 per process x 8 GPUs x 4
    assert tc.lr == 1e-5 and tc.lr_scheduler == "constant" and tc.lr_warmup_steps == 0
    with pytest.raises(ValueError, match="not a multiple"):
        tc.accumulation(3)
    with pytest.raises(ValueError, match="not both"):
        TrainConfig(global_batch_size=8, grad_accum=2)
    with pytest.raises(ValueError, match="mixed_precision"):
        TrainConfig(mixed_precision="fp8")


@pytest.mark.parametrize("variant", ["self", "dino"])
def test_gradient_checkpointing_gives_the_same_gradients(variant):
    """Checkpointing recomputes the Self-variant clean stream, whose keys/values leave the block as a side effect."""
    cfg = M2MConfig.preset("tiny", variant)
    nets = [M2MUNet(cfg), M2MUNet(cfg)]
    nets[1].load_state_dict(nets[0].state_dict())
    nets[1].unet.enable_gradient_checkpointing()
    g = torch.Generator().manual_seed(0)
    z_t, z_0 = torch.randn(2, 3, 3, 16, 16, generator=g), torch.randn(2, 3, 3, 16, 16, generator=g)
    context = z_0 if variant == "self" else torch.randn(2, 3, 5, 32, generator=g)
    t = torch.randint(0, 1000, (2, 3), generator=g)
    for net in nets:
        net.train()
        net(z_t, t, context).square().mean().backward()
    grads = [{k: p.grad for k, p in net.named_parameters()} for net in nets]
    assert all(grads[0][k] is not None for k in grads[0])
    isa_kv = [k for k in grads[0] if ".attn2.to_k." in k]
    assert isa_kv and all(grads[1][k].abs().sum() > 0 for k in isa_kv)  # keys/values got gradient through the cache
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-4, atol=1e-6, msg=k)


def test_train_with_gradient_checkpointing_runs(tmp_path):
    result = train(MICRO, micro_config(steps=2, gradient_checkpointing=True), list_data(), tmp_path,
                   progress=False, device="cpu")
    assert len(result.losses) == 2 and all(np.isfinite(result.losses))


def test_nan_names_shard_and_key(tmp_path):
    bad = {"latents": torch.full((2, 2, 3, 8, 8), float("nan")), "key": ["000003", "000004"],
           "shard": ["/data/mis-000007.tar"] * 2}
    with pytest.raises(FloatingPointError, match=r"last at step 1, data \['/data/mis-000007.tar#000003'"):
        train(MICRO, micro_config(steps=5, max_bad_steps=2), [bad], tmp_path, progress=False, device="cpu")


@pytest.mark.slow
def test_sigkilled_run_resumes_exactly(tmp_path):
    """A real kill (SIGKILL, possibly mid-save) after the first checkpoint; the resume matches an uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1"}
    # Bit-identical only with the same intra-op thread count (reduction order); the child's default may differ.
    proc = subprocess.Popen([sys.executable, str(root / "tests" / "scripts" / "train_until_killed.py"),
                             str(tmp_path / "killed"), str(torch.get_num_threads())], cwd=root, env=env)
    deadline = time.time() + 300
    while not (tmp_path / "killed" / "checkpoint-0000005" / "train_state.json").exists():
        assert proc.poll() is None and time.time() < deadline, "the child ended before its first checkpoint"
        time.sleep(0.2)
    time.sleep(1.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "final").exists()  # it really died before the end
    resumed = train(MICRO, micro_config(), list_data(), tmp_path / "killed", progress=False, device="cpu",
                    resume_from="latest")
    full = train(MICRO, micro_config(), list_data(), tmp_path / "full", progress=False, device="cpu")
    assert resumed.resumed_from is not None and resumed.losses == full.losses
