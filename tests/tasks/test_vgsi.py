import json

import numpy as np
import pytest
import torch
from PIL import Image

from m2m_pipeline.tasks import ProcedureSteps, TaskDataError, list_procedures
from m2m_pipeline.tasks.batching import make_task_loader
from m2m_pipeline.tasks.images import load_image
from m2m_pipeline.tasks.procedures import load_attributes, measure_progress, progress_error, write_procedure


def _png(path, colour=(200, 10, 10), size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_round_trip_layout(procedures_root):
    procedures = list_procedures(procedures_root)
    assert len(procedures) == 9
    for procedure in procedures:
        meta = load_attributes(procedures_root, procedure.key)
        assert len(procedure.steps) == meta["n_steps"] and 6 <= meta["n_steps"] <= 10
        assert [p.name for p in procedure.steps] == [f"step_{k:02d}.png" for k in range(meta["n_steps"])]


def test_dataset_items_consecutive_and_batched(procedures_root):
    ds = ProcedureSteps(procedures_root, n_steps=5, image_size=16, seed=2)
    item = ds[0]
    assert item["latents"].shape == (5, 3, 16, 16) and item["task_cond"].shape == (5,)
    assert item["task_cond"].dtype == torch.float32
    assert torch.equal(item["steps"], item["steps"][0] + torch.arange(5))
    torch.testing.assert_close(item["task_cond"], item["steps"].float())
    step0 = int(item["steps"][0])
    torch.testing.assert_close(item["latents"][0], load_image(ds.procedures[0].steps[step0], 16))
    relative = ProcedureSteps(procedures_root, n_steps=5, image_size=16, seed=2, relative_positions=True)
    torch.testing.assert_close(relative[0]["task_cond"], torch.arange(5.0))
    batch = next(iter(make_task_loader(ds, batch_size=4)))
    assert batch["latents"].shape == (4, 5, 3, 16, 16) and batch["task_cond"].shape == (4, 5)


def test_seeded_starts(procedures_root):
    a = ProcedureSteps(procedures_root, n_steps=3, seed=5)
    b = ProcedureSteps(procedures_root, n_steps=3, seed=5)
    assert [a.draw_start(i) for i in range(9)] == [b.draw_start(i) for i in range(9)]
    b.set_epoch(3)
    assert [a.draw_start(i) for i in range(9)] != [b.draw_start(i) for i in range(9)]


def test_procedures_deterministic_from_seed(tmp_path):
    write_procedure(tmp_path / "a", 5, seed=1)
    write_procedure(tmp_path / "b", 5, seed=1)
    a, b = tmp_path / "a/proc_000005/method_0", tmp_path / "b/proc_000005/method_0"
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    for path in a.iterdir():
        assert path.read_bytes() == (b / path.name).read_bytes()


def test_attribute_check_reads_true_progress(procedures_root):
    ds = ProcedureSteps(procedures_root, n_steps=6, image_size=32, seed=0)
    items = [ds[i] for i in range(len(ds))]
    metas = [load_attributes(procedures_root, it["key"]) for it in items]
    images = torch.stack([it["latents"] for it in items])       # (B, 6, 3, 32, 32)
    steps = torch.stack([it["steps"] for it in items])          # (B, 6)
    errors = progress_error(images, metas, steps)
    step_size = torch.tensor([1 / (m["n_steps"] - 1) for m in metas])[:, None]
    assert (errors < 0.25 * step_size).all(), errors  # the check tells neighbouring steps apart
    shifted = progress_error(images[:, :-1], metas, steps[:, 1:])  # each image labelled as the next step
    assert (shifted > 0.75 * step_size).all()


def test_measure_progress_nan_without_foreground(procedures_root):
    meta = load_attributes(procedures_root, list_procedures(procedures_root)[0].key)
    background = torch.tensor(meta["bg"]).float()[:, None, None].expand(3, 32, 32) * 2 - 1
    assert np.isnan(measure_progress(background, meta))


def test_folder_layout_orders_by_step_number(tmp_path):
    for n in (10, 2, 1):
        _png(tmp_path / "make-tea" / "m1" / f"step_{n}.jpg")
    (tmp_path / "make-tea" / "m1" / "notes.txt").write_text("ignored")
    [procedure] = list_procedures(tmp_path)
    assert [p.name for p in procedure.steps] == ["step_1.jpg", "step_2.jpg", "step_10.jpg"]
    assert procedure.key == "make-tea/m1"
    image = ProcedureSteps(tmp_path, n_steps=3, image_size=8)[0]["latents"]
    assert image.shape == (3, 3, 8, 8)  # 40x30 centre-cropped to square, resized


def test_index_layout(tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        _png(tmp_path / "imgs" / name)
    (tmp_path / "index.json").write_text(json.dumps({"art": {"m": ["imgs/c.png", "imgs/a.png", "imgs/b.png"]}}))
    [procedure] = list_procedures(tmp_path)
    assert [p.name for p in procedure.steps] == ["c.png", "a.png", "b.png"]


def test_errors_name_the_file(tmp_path):
    _png(tmp_path / "art" / "m" / "step_01.png")
    _png(tmp_path / "art" / "m" / "cover.png")
    with pytest.raises(TaskDataError, match=r"cover\.png: step image name has no step number"):
        list_procedures(tmp_path)
    (tmp_path / "art" / "m" / "cover.png").unlink()
    _png(tmp_path / "art" / "m" / "step_1.jpg")
    with pytest.raises(TaskDataError, match=r"step_1\.jpg.*step number 1 also used by step_01\.png|"
                                            r"step_01\.png.*step number 1 also used by step_1\.jpg"):
        list_procedures(tmp_path)
    (tmp_path / "index.json").write_text(json.dumps({"art": {"m": ["art/m/step_01.png", "art/m/gone.png"]}}))
    with pytest.raises(TaskDataError, match=r"gone\.png: listed in .*index\.json \(art/m\) but missing"):
        list_procedures(tmp_path)
    (tmp_path / "index.json").write_text("{not json")
    with pytest.raises(TaskDataError, match=r"index\.json: cannot read index"):
        list_procedures(tmp_path)
    (tmp_path / "index.json").write_text(json.dumps({"art": {"m": ["art/m/step_01.png"]}}))
    with pytest.raises(TaskDataError, match=r"no procedure has 2 or more step images \(1 procedures found\)"):
        ProcedureSteps(tmp_path, n_steps=2)
    (tmp_path / "art" / "m" / "step_01.png").write_bytes(b"garbage")
    with pytest.raises(TaskDataError, match=r"step_01\.png: cannot read image"):
        ProcedureSteps(tmp_path, n_steps=1)[0]
