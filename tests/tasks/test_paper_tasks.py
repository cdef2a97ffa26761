"""The paper's task fine-tunes (Sec. 6.2, 8.5, App. A; docs/tasks.md "Paper presets"): the presets, the
encoders on the compute device in batches, the real-layout fixtures and the folder catalogs."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from m2m_pipeline.network import M2MConfig, M2MUNet
from m2m_pipeline.tasks import (
    ObjaverseViews,
    ProcedureSteps,
    TaskDataError,
    list_objects,
    list_procedures,
)
from m2m_pipeline.tasks.finetune import (
    FinetuneConfig,
    TaskFeatures,
    make_splits,
    task_dataset,
)
from m2m_pipeline.tasks.folders import (
    objaverse_catalog,
    vgsi_catalog,
    write_objaverse_fixture,
    write_vgsi_fixture,
)


# ---------------------------------------------------------------------- presets
def test_paper_presets_follow_the_paper():
    nvs, proc = FinetuneConfig.preset("paper", "camera"), FinetuneConfig.preset("paper", "position")
    for cfg in (nvs, proc):
        t, e = cfg.train, cfg.eval
        assert cfg.net_preset == "paper" and M2MConfig.preset(cfg.net_preset).image_size == 512
        # App. A, as pretraining: AdamW 1e-5, constant, no warm-up, global batch 256
        assert (t.lr, t.lr_scheduler, t.lr_warmup_steps, t.global_batch_size) == (1e-5, "constant", 0, 256)
        assert t.batch_size == 8 and t.global_batch(1) == 256 and t.use_ema and t.gradient_checkpointing
        # App. A: DDIM, 50 steps, guidance 7.5 for the preceding images; s_C chosen on validation
        assert (e.steps, e.s_I, e.sweep_s_I) == (50, 7.5, (7.5,)) and 7.5 in e.sweep_s_C
        assert not cfg.spatial_bias  # the model as published
    # Fig. 7: one input view -> four novel views; Fig. 8: four steps -> the next four
    assert (nvs.eval.context_images, nvs.eval.target_images, nvs.train.n_images) == (1, 4, 5)
    assert (proc.eval.context_images, proc.eval.target_images, proc.train.n_images) == (4, 4, 8)
    assert nvs.min_steps == 5 and proc.min_steps == 8
    # the smoke / demo presets keep what they had
    assert FinetuneConfig.preset("demo", "position").eval.target_images == 2
    assert FinetuneConfig.preset("demo", "camera").eval.s_I == 1.0


def test_finetune_config_round_trips_through_json():
    cfg = FinetuneConfig.preset("paper", "position")
    assert FinetuneConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    old = cfg.to_dict()
    del old["spatial_bias"], old["encode_batch_size"]  # a run recorded before the fields existed
    assert FinetuneConfig.from_dict(old).spatial_bias is False


# ---------------------------------------------------------------------- encoders on the device, batched
class SpyEncoder(torch.nn.Module):
    """Records the device and size of every batch it encodes; (n, 3, S, S) -> (n, 2, 4) (or (n, 4, 2, 2))."""

    def __init__(self, tokens: bool):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))
        self.tokens, self.calls = tokens, []

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self.calls.append((images.device, images.shape[0]))
        flat = images.mean(dim=(1, 2, 3)) * self.weight  # (n,): a function of each image alone
        shape = (2, 4) if self.tokens else (4, 2, 2)
        return flat.view(-1, *[1] * len(shape)).expand(-1, *shape)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_task_features_encode_on_the_device_in_batches(polyhedra_root, device):
    """The device argument reaches both encoders (their weights and every batch they see; "meta" is a device
    no default would pick), and a batch is encoded `encode_batch_size` images per forward."""
    data = task_dataset("camera", polyhedra_root, list_objects(polyhedra_root)[:4], 3, 16)
    vae, dino = SpyEncoder(tokens=False), SpyEncoder(tokens=True)
    features = TaskFeatures(data, vae, dino, device=device, encode_batch_size=5)
    assert vae.weight.device.type == dino.weight.device.type == device
    batch = next(features.batches(4, shuffle=False))
    assert batch["latents"].shape == (4, 3, 4, 2, 2) and batch["dino"].shape == (4, 3, 2, 4)
    assert batch["latents"].device.type == batch["dino"].device.type == device
    assert batch["images"].device.type == "cpu"  # the pixels stay where the metrics read them
    for spy in (vae, dino):
        assert [n for _, n in spy.calls] == [5, 5, 2]  # 4 x 3 images, 5 per forward
        assert all(d.type == device for d, _ in spy.calls)


def test_batched_encode_equals_one_image_at_a_time(polyhedra_root):
    from m2m_pipeline.data import get_preset
    from m2m_pipeline.data.features import encoder_spec

    dino = encoder_spec(get_preset("tiny")).build_dino()
    data = task_dataset("camera", polyhedra_root, list_objects(polyhedra_root)[:3], 3, 16)
    batched = next(TaskFeatures(data, None, dino, device="cpu", encode_batch_size=4).batches(3, shuffle=False))
    for i in range(3):
        single = TaskFeatures(data, None, dino, device="cpu", encode_batch_size=1)[i]
        assert torch.allclose(batched["dino"][i], single["dino"], atol=1e-5)
        assert torch.equal(single["latents"], data[i]["latents"])  # pixel models train on the images


def test_finetune_hands_its_device_to_the_encoders(polyhedra_root, tmp_path, monkeypatch):
    """finetune(device=...) (the assets pass compute.resolved_device()) builds the DINO encoder there."""
    import m2m_pipeline.tasks.finetune as ft

    torch.manual_seed(0)
    base = M2MUNet(M2MConfig.preset("tiny", "dino")).save_pretrained(tmp_path / "base")
    seen = {}

    def fake_train(net_config, train_config, batches, out_dir, **kw):
        seen.update(device=kw["device"], features=batches.dataset.device,
                    dino=next(batches.dataset.dino.parameters()).device)
        raise RuntimeError("stop")

    monkeypatch.setattr(ft, "train", fake_train)
    with pytest.raises(RuntimeError, match="stop"):
        ft.finetune(FinetuneConfig.preset("tiny", "camera"), polyhedra_root, tmp_path / "run", base=base,
                    device="meta", progress=False)
    assert seen["device"] == "meta" and seen["features"].type == "meta" and seen["dino"].type == "meta"


# ---------------------------------------------------------------------- splits of procedures by length
def test_short_procedures_are_in_no_split(tmp_path):
    write_vgsi_fixture(tmp_path / "long", 6, steps=8, image_size=16)
    write_vgsi_fixture(tmp_path / "short", 3, steps=5, image_size=16, seed=1)
    merged = {**json.loads((tmp_path / "long/index.json").read_text())}
    for article, methods in json.loads((tmp_path / "short/index.json").read_text()).items():
        merged["short_" + article] = {m: [str(tmp_path / "short" / p) for p in steps] for m, steps in methods.items()}
    (tmp_path / "long/index.json").write_text(json.dumps(merged))
    assert len(list_procedures(tmp_path / "long")) == 9
    s = make_splits("position", tmp_path / "long", held_out=2, validation=1, min_steps=8)
    every = s.train + s.validation + s.test
    assert len(every) == 6 and not any(k.startswith("short_") for k in every)
    with pytest.raises(TaskDataError, match="no procedure has 9 or more step images"):
        make_splits("position", tmp_path / "long", 2, 1, min_steps=9)


# ---------------------------------------------------------------------- fixtures in the real layouts
def test_objaverse_fixture_is_what_the_reader_reads(tmp_path):
    uids = write_objaverse_fixture(tmp_path, objects=3, views=12, image_size=32)
    assert list_objects(tmp_path) == sorted(uids) and all(re.fullmatch(r"[0-9a-f]{32}", u) for u in uids)
    folder = tmp_path / uids[0]
    with Image.open(folder / "000.png") as image:
        assert image.mode == "RGBA" and image.size == (32, 32)
        alpha = np.asarray(image)[..., 3]
    assert alpha.min() == 0 and alpha.max() == 255  # a render on a transparent background
    pose = np.load(folder / "000.npy", allow_pickle=False)
    assert pose.shape == (3, 4) and pose.dtype == np.float32
    item = ObjaverseViews(tmp_path, n_views=5, image_size=16)[0]
    assert item["latents"].shape == (5, 3, 16, 16) and item["task_cond"].shape == (5, 12)
    assert write_objaverse_fixture(tmp_path, objects=3, views=12, image_size=32) == uids  # kept, same uids


def test_vgsi_fixture_is_what_the_reader_reads(tmp_path):
    from m2m_pipeline.tasks.images import load_image
    from m2m_pipeline.tasks.metrics import psnr
    from m2m_pipeline.tasks.procedures import make_procedure, render_step

    keys = write_vgsi_fixture(tmp_path, procedures=4, steps=8, image_size=48)
    procedures = list_procedures(tmp_path)  # from index.json
    assert sorted(p.key for p in procedures) == sorted(keys) and len(keys) == 4
    assert {p.method for p in procedures} == {"Method_1", "Method_2"}  # an article with two methods
    assert all(len(p.steps) == 8 and p.steps[0].suffix == ".jpg" for p in procedures)
    with Image.open(procedures[0].steps[0]) as image:
        assert image.format == "JPEG" and image.size == (64, 48)  # a 4:3 photo
    # the reader's centre crop gives back the rendered square picture (up to JPEG)
    first = next(p for p in procedures if p.key == keys[0])
    meta = make_procedure(np.random.default_rng([0, 0]))
    truth = torch.from_numpy(render_step(meta, 3 / 7, 48, 2)).permute(2, 0, 1).float() * 2 - 1
    assert psnr(load_image(first.steps[3], 48)[None], truth[None]).item() > 30
    item = ProcedureSteps(tmp_path, n_steps=8, image_size=16)[0]
    assert item["latents"].shape == (8, 3, 16, 16) and item["task_cond"].tolist() == list(range(8))


def test_catalogs_index_and_preview_the_folders(tmp_path):
    uids = write_objaverse_fixture(tmp_path / "objaverse", 3, image_size=16)
    index = objaverse_catalog(tmp_path / "objaverse", tmp_path / "out_o", preview_items=2, preview_size=16)
    assert index["objects"] == 3 and index["preview"] == sorted(uids)[:2]
    with Image.open(tmp_path / "out_o/preview.png") as image:
        assert image.size == (12 * 18 - 2, 2 * 18 - 2)  # 2 objects x 12 views, 2 px gaps
    assert json.loads((tmp_path / "out_o/index.json").read_text())["keys_sha256"] == index["keys_sha256"]
    write_vgsi_fixture(tmp_path / "vgsi", 3, steps=6, image_size=16)
    v = vgsi_catalog(tmp_path / "vgsi", tmp_path / "out_v", min_steps=6)
    assert (v["procedures"], v["usable"], v["steps_histogram"]) == (3, 3, {"6": 3})
    assert (tmp_path / "out_v/preview.png").is_file() and v["layout"] == "vgsi (index.json)"


def test_catalogs_name_the_bad_file(tmp_path):
    write_objaverse_fixture(tmp_path / "eleven", 1, views=11, image_size=16)  # the reader wants 12 views
    with pytest.raises(TaskDataError, match=r"011\.png: missing"):
        objaverse_catalog(tmp_path / "eleven", tmp_path / "o")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TaskDataError, match="no object folders"):
        objaverse_catalog(tmp_path / "empty", tmp_path / "o")
    write_vgsi_fixture(tmp_path / "vgsi", 2, steps=4, image_size=16)
    with pytest.raises(TaskDataError, match="no procedure has 8 or more step images"):
        vgsi_catalog(tmp_path / "vgsi", tmp_path / "v", min_steps=8)
    (tmp_path / "vgsi/images/How_to_Do_Task_00000/Method_1/step_2.jpg").unlink()
    with pytest.raises(TaskDataError, match=r"step_2\.jpg: listed in .*index\.json"):
        vgsi_catalog(tmp_path / "vgsi", tmp_path / "v")
