"""DINO stand-in pretraining (m2m_pipeline/pretrain/dino_standin.py): the demo recipe keeps the stand-in's
architecture, the loss is NT-Xent, training resumes exactly from its safetensors + JSON checkpoints, and the
exported folder loads with the stand-in's preprocessing."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from m2m_pipeline.data.config import MIS_PRESETS
from m2m_pipeline.data.features import encoder_spec
from m2m_pipeline.encoders import DinoEncoder
from m2m_pipeline.pretrain.dino_standin import (
    DinoPretrainConfig,
    augment,
    checkpoints,
    get_preset,
    load_optimizer_tensors,
    nt_xent,
    optimizer_tensors,
    pretrain,
    ship,
    view_transform,
)
from m2m_pipeline.pretrain.manifest import load_pretrained_dino


def test_demo_preset_is_the_demo_stand_in_architecture():
    cfg = get_preset("demo")
    stand_in = encoder_spec(MIS_PRESETS["demo"]).build_dino()  # what the demo's feature cache uses
    pretrained_init = DinoEncoder.random(**cfg.architecture())
    assert pretrained_init.model.config.to_dict() == stand_in.model.config.to_dict()
    for (name, a), (_, b) in zip(pretrained_init.model.state_dict().items(), stand_in.model.state_dict().items()):
        assert torch.equal(a, b), name  # pretraining starts from the stand-in's own weights


def test_presets_and_config_checks():
    assert get_preset("tiny").hidden_size == MIS_PRESETS["tiny"].dino_hidden_size
    with pytest.raises(ValueError, match="unknown DINO pretraining preset 'huge'"):
        get_preset("huge")
    with pytest.raises(ValueError, match="batch_size"):
        get_preset("tiny").replace(batch_size=1)
    with pytest.raises(ValueError, match="image_size 20 is not a multiple of patch_size 8"):
        get_preset("tiny").replace(image_size=20)
    cfg = get_preset("demo")
    assert DinoPretrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())), where="x") == cfg


def test_nt_xent_rewards_matching_views():
    torch.manual_seed(0)
    z = torch.randn(8, 16)
    aligned = nt_xent(torch.cat([z, z]), temperature=0.2)
    shuffled = nt_xent(torch.cat([z, z[torch.randperm(8)]]), temperature=0.2)
    assert aligned < 0.5 < 2.0 < shuffled
    with pytest.raises(ValueError, match="nt_xent needs"):
        nt_xent(torch.randn(3, 4), 0.2)


def test_views_are_per_image_and_jitter_colour():
    cfg = get_preset("tiny")
    images = torch.full((4, 3, 16, 16), -1.0)
    images[:, 0, 4:12, 4:12] = 1.0  # a red square on black
    torch.manual_seed(0)
    views = augment(images, view_transform(cfg.replace(jitter_p=1.0, grayscale_p=0.0)))
    assert views.shape == images.shape and views.min() >= -1 and views.max() <= 1
    assert not torch.allclose(views[0], views[1])  # one draw per image, not one per batch
    hues = views.amax(dim=(2, 3))
    assert (hues[:, 1:] > -0.9).any()  # colour jitter moved the pure red into other channels


def test_optimizer_state_round_trips_through_safetensors(tmp_path):
    from safetensors.torch import save_file

    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    tensors, meta = optimizer_tensors(opt)
    save_file(tensors, tmp_path / "opt.safetensors")
    fresh = torch.optim.AdamW(net.parameters(), lr=1.0)
    load_optimizer_tensors(fresh, load_file(tmp_path / "opt.safetensors"), json.loads(json.dumps(meta)))
    a, b = opt.state_dict(), fresh.state_dict()
    assert a["param_groups"][0]["lr"] == b["param_groups"][0]["lr"] == 1e-2
    for index in a["state"]:
        for key in a["state"][index]:
            assert torch.equal(torch.as_tensor(a["state"][index][key]), torch.as_tensor(b["state"][index][key]))


def test_resumed_training_matches_the_uninterrupted_run(tmp_path):
    cfg = get_preset("tiny")
    whole = pretrain(cfg, tmp_path / "whole", seconds=600, max_steps=4, progress=False)
    pretrain(cfg, tmp_path / "split", seconds=600, max_steps=2, progress=False)
    resumed = pretrain(cfg, tmp_path / "split", seconds=600, max_steps=4, progress=False)
    assert whole.steps == resumed.steps == 4
    state = json.loads((resumed.checkpoint / "state.json").read_text())
    assert state["step"] == 4 and state["seed"] == cfg.seed and len(state["sessions"]) == 2
    assert [c.name for c in checkpoints(tmp_path / "split")] == ["checkpoint-00000002", "checkpoint-00000004"]
    a, b = load_file(whole.checkpoint / "weights.safetensors"), load_file(resumed.checkpoint / "weights.safetensors")
    assert a.keys() == b.keys() and any(k.startswith("head.") for k in a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key)
    assert not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob("*.bin"))  # no pickle anywhere
    with pytest.raises(ValueError, match="checkpoint of another recipe \\(differs in lr\\)"):
        pretrain(cfg.replace(lr=0.5), tmp_path / "split", seconds=600, max_steps=5, progress=False)


def test_exported_encoder_loads_like_the_stand_in_and_ships_pinned(tmp_path):
    cfg = get_preset("tiny")
    result = pretrain(cfg, tmp_path / "run", seconds=600, max_steps=2, progress=False)
    loaded = DinoEncoder.from_pretrained(result.encoder)
    stand_in = DinoEncoder.random(**cfg.architecture())
    assert (loaded.image_size, loaded.resize_size) == (stand_in.image_size, stand_in.resize_size) == (16, 16)
    bookkeeping = {"dtype", "architectures", "_name_or_path"}  # written by save_pretrained, not architecture
    assert ({k: v for k, v in loaded.model.config.to_dict().items() if k not in bookkeeping}
            == {k: v for k, v in stand_in.model.config.to_dict().items() if k not in bookkeeping})
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert not torch.allclose(loaded.encode(x), stand_in.encode(x))  # the weights moved
    shipped, _ = ship(tmp_path / "run", tmp_path / "models")
    assert sorted(p.name for p in shipped.iterdir()) == ["config.json", "model.safetensors",
                                                          "preprocessor_config.json"]
    entry = json.loads((tmp_path / "models" / "MANIFEST.json").read_text())["models"]["dino_standin"]
    assert entry["steps"] == 2 and entry["seed"] == cfg.seed and entry["machine"]["cpu_count"] >= 1
    torch.testing.assert_close(load_pretrained_dino("dino_standin", tmp_path / "models").encode(x), loaded.encode(x))


@pytest.mark.slow
def test_sigterm_ends_the_run_with_a_checkpoint(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "m2m_pipeline.pretrain.dino_standin", "--preset", "tiny",
                             "--out", str(out), "--seconds", "600", "--steps", "1000000"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    buffered = ""
    deadline = time.monotonic() + 120
    while "step/s" not in buffered and "s/step" not in buffered and time.monotonic() < deadline:
        buffered += proc.stdout.read(1)  # tqdm's progress line: the loop is running
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, buffered + rest
    state = json.loads((checkpoints(out)[-1] / "state.json").read_text())
    assert state["step"] < 1000000 and (out / "encoder" / "model.safetensors").is_file()


def test_probe_reads_checkpoints_beside_the_random_stand_in(tmp_path):
    from m2m_pipeline.pretrain.dino_standin import probe_checkpoints

    cfg = get_preset("tiny")
    pretrain(cfg, tmp_path / "run", seconds=600, max_steps=2, progress=False)
    results = probe_checkpoints([tmp_path / "run"], cfg, train_images=40, heldout_images=20, cls=True)
    names = list(results)
    assert names[:2] == ["random stand-in (tokens)", "random stand-in (CLS)"] and len(names) == 4
    assert names[2].startswith("SimCLR 2 steps, ") and names[3].endswith("(CLS)")
    assert all(0.0 <= acc <= 1.0 for accs in results.values() for acc in accs.values())
    with pytest.raises(FileNotFoundError, match="neither a pretraining checkpoint nor a run directory"):
        probe_checkpoints([tmp_path], cfg)
