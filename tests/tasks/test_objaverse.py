import json

import numpy as np
import pytest
import torch
from PIL import Image

from m2m_pipeline.tasks import ObjaverseViews, TaskDataError, camera_condition, list_objects, split_uids
from m2m_pipeline.tasks.batching import make_task_loader
from m2m_pipeline.tasks.images import load_image
from m2m_pipeline.tasks.objaverse import load_views
from m2m_pipeline.tasks.polyhedra import RenderSettings, write_object


def test_round_trip_layout(polyhedra_root):
    uids = list_objects(polyhedra_root)
    assert len(uids) == 6
    folder = polyhedra_root / uids[0]
    assert sorted(p.name for p in folder.glob("*.png")) == [f"{v:03d}.png" for v in range(12)]
    assert Image.open(folder / "000.png").mode == "RGBA"
    meta = json.loads((folder / "object.json").read_text())
    images, w2c = load_views(folder, range(12), 32)
    assert images.shape == (12, 3, 32, 32) and images.min() >= -1 and images.max() <= 1
    assert (images[:, :, 0, 0] == 1).all()  # transparent corner composited on white
    assert images.std(dim=(1, 2, 3)).min() > 0.05  # the object is visible in every view
    # The cameras read back are the orbit written (float32 on disk).
    eye = -(w2c[:, :, :3].transpose(1, 2) @ w2c[:, :, 3:]).squeeze(-1).numpy()  # camera centres
    np.testing.assert_allclose(np.linalg.norm(eye, axis=1), 2.0, atol=1e-5)
    np.testing.assert_allclose(np.degrees(np.arcsin(eye[:, 2] / 2.0)), meta["elevations_deg"], atol=1e-3)
    azimuth_error = (np.degrees(np.arctan2(eye[:, 1], eye[:, 0])) - meta["azimuths_deg"] + 180) % 360 - 180
    np.testing.assert_allclose(azimuth_error, 0, atol=1e-3)


def test_dataset_items_and_batches(polyhedra_root):
    ds = ObjaverseViews(polyhedra_root, n_views=4, image_size=16, seed=1)
    item = ds[2]
    assert item["latents"].shape == (4, 3, 16, 16) and item["latents"].dtype == torch.float32
    assert item["task_cond"].shape == (4, 12)
    torch.testing.assert_close(item["task_cond"][0], torch.eye(3, 4).flatten())  # first view is the reference
    torch.testing.assert_close(item["task_cond"], camera_condition(item["w2c"].double()).float(), atol=1e-5, rtol=0)
    assert len(set(item["views"].tolist())) == 4
    batch = next(iter(make_task_loader(ds, batch_size=3, seed=0)))
    assert batch["latents"].shape == (3, 4, 3, 16, 16) and batch["task_cond"].shape == (3, 4, 12)
    assert len(batch["key"]) == 3


def test_seeded_subsets(polyhedra_root):
    a = ObjaverseViews(polyhedra_root, n_views=5, seed=7)
    b = ObjaverseViews(polyhedra_root, n_views=5, seed=7)
    assert [a.draw_views(i) for i in range(6)] == [b.draw_views(i) for i in range(6)]
    torch.testing.assert_close(a[1]["latents"], b[1]["latents"])
    b.set_epoch(1)
    assert [a.draw_views(i) for i in range(6)] != [b.draw_views(i) for i in range(6)]


def test_polyhedra_deterministic_from_seed(tmp_path):
    settings = RenderSettings(n_views=3)
    for name in ("a", "b"):
        write_object(tmp_path / name, 4, seed=11, settings=settings)
    for view in range(3):
        assert (tmp_path / "a/poly_000004" / f"{view:03d}.png").read_bytes() == \
               (tmp_path / "b/poly_000004" / f"{view:03d}.png").read_bytes()
        np.testing.assert_array_equal(np.load(tmp_path / f"a/poly_000004/{view:03d}.npy"),
                                      np.load(tmp_path / f"b/poly_000004/{view:03d}.npy"))
    write_object(tmp_path / "c", 4, seed=12, settings=settings)
    assert (tmp_path / "c/poly_000004/000.png").read_bytes() != (tmp_path / "a/poly_000004/000.png").read_bytes()


def test_split_uids_is_disjoint_and_seeded():
    uids = [f"u{i}" for i in range(10)]
    train, held = split_uids(uids, 0.3, seed=1)
    assert len(held) == 3 and not set(train) & set(held) and sorted(train + held) == sorted(uids)
    assert split_uids(uids, 0.3, seed=1) == (train, held)


@pytest.fixture
def one_object(tmp_path):
    write_object(tmp_path, 0, seed=0, settings=RenderSettings(n_views=12, image_size=16))
    return tmp_path, tmp_path / "poly_000000"


def test_missing_npy_is_named(one_object):
    root, folder = one_object
    (folder / "007.npy").unlink()
    with pytest.raises(TaskDataError, match=r"poly_000000/007\.npy: missing"):
        ObjaverseViews(root)


def test_bad_npy_is_named(one_object):
    _, folder = one_object
    np.save(folder / "003.npy", np.zeros((3, 3)))
    with pytest.raises(TaskDataError, match=r"003\.npy: camera matrix must be 3x4"):
        load_views(folder, [3], 16)
    (folder / "004.npy").write_bytes(b"not an npy file")
    with pytest.raises(TaskDataError, match=r"004\.npy: cannot read camera matrix"):
        load_views(folder, [4], 16)
    np.save(folder / "005.npy", 2 * np.eye(3, 4))
    with pytest.raises(TaskDataError, match=r"005\.npy: .*not a rotation"):
        load_views(folder, [5], 16)


def test_bad_png_is_named(one_object):
    _, folder = one_object
    (folder / "002.png").write_bytes(b"\x89PNG truncated")
    with pytest.raises(TaskDataError, match=r"002\.png: cannot read image"):
        load_image(folder / "002.png", 16)


def test_empty_root_is_named(tmp_path):
    with pytest.raises(TaskDataError, match="no object folders"):
        list_objects(tmp_path)


def test_command_writes_both_stand_ins(tmp_path, capsys):
    from m2m_pipeline.tasks.__main__ import main

    main(["polyhedra", str(tmp_path / "obj"), "-n", "2", "--size", "16"])
    main(["procedures", str(tmp_path / "proc"), "-n", "2", "--start", "5"])
    assert list_objects(tmp_path / "obj") == ["poly_000000", "poly_000001"]
    assert sorted(p.name for p in (tmp_path / "proc").iterdir()) == ["proc_000005", "proc_000006"]
    assert "2 procedures" in capsys.readouterr().out
