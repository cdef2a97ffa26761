"""MSCOCO zero-shot continuation (Sec. 8.3, Figs. 5, 16, 17): the COCO 2017 reader's grouping rule and its bounded,
one-line errors; the library function end to end on a tiny random checkpoint and a tiny random CLIP; the CLI; the
asset's settings check."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from m2m_pipeline.data.coco import (
    FIXTURE_CATEGORIES,
    CocoError,
    CocoSetsConfig,
    draw_sets,
    load_coco_sets,
    load_set_images,
    read_instances,
    write_coco_fixture,
)
from m2m_pipeline.evaluation.coco_zero_shot import (
    CocoZeroShotSpec,
    clip_consistency,
    coco_zero_shot,
)
from m2m_pipeline.evaluation.studies import SamplingSpec

FAST = SamplingSpec(steps=1, guidance_scale=2.0)


# ---------------------------------------------------------------------- hand-built COCO folders
def _jpeg(path: Path, w: int, h: int, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path, format="JPEG")


def _write(root: Path, doc: dict, split: str = "val", images: bool = True) -> Path:
    if images:
        for i, im in enumerate(doc["images"]):
            _jpeg(root / f"{split}2017" / im["file_name"], im["width"], im["height"], seed=i)
    path = root / "annotations" / f"instances_{split}2017.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return root


def _doc() -> dict:
    """Image 1: a crowd 'dog' region larger than its 'cat' -> cat; image 2: two equal areas -> the first listed
    (person); image 3: only a crowd region -> no category; image 4: cat beats a smaller person."""
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "width": 24, "height": 16} for i in (1, 2, 3, 4)]
    ann = lambda image, cat, area, crowd=0: {"image_id": image, "category_id": cat, "area": area,
                                             "iscrowd": crowd}
    annotations = [ann(1, 17, 100.0), ann(1, 18, 300.0, 1), ann(1, 1, 50),
                   ann(2, 1, 80.0), ann(2, 17, 80.0),
                   ann(3, 18, 200.0, 1),
                   ann(4, 1, 10.5), ann(4, 17, 99.5)]
    return {"images": images, "annotations": annotations,
            "categories": [{"id": 1, "name": "person"}, {"id": 17, "name": "cat"}, {"id": 18, "name": "dog"}]}


def test_grouping_rule_largest_non_crowd_instance(tmp_path):
    index = read_instances(_write(tmp_path, _doc()), "val")
    assert index.groups() == {1: [2], 17: [1, 4], 18: []}  # crowd ignored, tie to the first listed, 3 in none
    assert len(index.sha256) == 64 and index.categories[17] == "cat"


def test_draw_sets_one_category_per_set_seeded_disjoint(tmp_path):
    root = write_coco_fixture(tmp_path / "coco", images_per_category=9)
    index = read_instances(root)
    owner = {i: c for c, ids in index.groups().items() for i in ids}
    sets = draw_sets(index, CocoSetsConfig(views=4, sets_per_category=2, seed=3))
    assert len(sets.sets) == 2 * len(FIXTURE_CATEGORIES) and not sets.skipped
    seen = [i for s in sets.sets for i in s.image_ids]
    assert len(seen) == len(set(seen))  # no image in two sets
    for s in sets.sets:
        assert len(s.image_ids) == 4 and {owner[i] for i in s.image_ids} == {s.category_id}
        assert s.category == index.categories[s.category_id]
    # round-robin: the first sets cover every category before any category's second set
    assert len({s.category for s in sets.sets[:len(FIXTURE_CATEGORIES)]}) == len(FIXTURE_CATEGORIES)
    again = draw_sets(index, CocoSetsConfig(views=4, sets_per_category=2, seed=3))
    other = draw_sets(index, CocoSetsConfig(views=4, sets_per_category=2, seed=4))
    assert again.sets == sets.sets and other.sets != sets.sets
    capped = draw_sets(index, CocoSetsConfig(max_sets=3, categories=("cat", "cup")))
    assert len(capped.sets) == 2 and {s.category for s in capped.sets} == {"cat", "cup"}
    assert draw_sets(index, CocoSetsConfig(max_sets=3)).provenance()["config"]["max_sets"] == 3
    assert len(draw_sets(index, CocoSetsConfig(max_sets=3)).sets) == 3


def test_small_categories_are_skipped_and_reported(tmp_path):
    index = read_instances(_write(tmp_path, _doc()))
    sets = draw_sets(index, CocoSetsConfig(views=2))
    assert [s.category for s in sets.sets] == ["cat"] and sets.skipped == {"person": 1, "dog": 0}
    assert sets.provenance()["skipped_categories"] == {"person": 1, "dog": 0}
    with pytest.raises(CocoError, match=r"no category owns 3 images \(3 views x 1 sets\)"):
        draw_sets(index, CocoSetsConfig(views=3))
    with pytest.raises(CocoError, match="'horse' is not in categories"):
        draw_sets(index, CocoSetsConfig(views=2, categories=("horse",)))


def _broken(change) -> dict:
    doc = copy.deepcopy(_doc())
    change(doc)
    return doc


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d["images"][1].pop("width"), r"images\[1\]\.width: missing"),
    (lambda d: d["images"][0].update(width="24"), r"images\[0\]\.width: expected a positive integer, got '24'"),
    (lambda d: d["images"][0].update(height=0), r"images\[0\]\.height: expected a positive integer"),
    (lambda d: d["images"][2].update(id=True), r"images\[2\]\.id: expected an integer"),
    (lambda d: d["images"][0].update(file_name="../x.jpg"), r"images\[0\]\.file_name: '\.\./x\.jpg' is not a plain"),
    (lambda d: d["images"].append(dict(d["images"][0])), r"images\[4\]\.id: 1 is listed twice"),
    (lambda d: d["annotations"][3].pop("area"), r"annotations\[3\]\.area: missing"),
    (lambda d: d["annotations"][0].update(area=float("nan")), r"annotations\[0\]\.area: expected a finite number"),
    (lambda d: d["annotations"][0].update(iscrowd=2), r"annotations\[0\]\.iscrowd: expected 0 or 1"),
    (lambda d: d["annotations"][5].update(category_id=99), r"annotations\[5\]\.category_id: 99 is not in categories"),
    (lambda d: d["annotations"][0].update(image_id=7), r"annotations\[0\]\.image_id: 7 is not in images"),
    (lambda d: d["categories"][0].update(name=3), r"categories\[0\]\.name: expected a non-empty string"),
    (lambda d: d["categories"][1].pop("id"), r"categories\[1\]\.id: missing"),
    (lambda d: d.pop("annotations"), r"annotations: missing or not a list"),
    (lambda d: d.update(images=[], annotations=[]), r"images: empty"),
])
def test_schema_errors_name_file_list_index_and_field(tmp_path, change, message):
    root = _write(tmp_path, _broken(change), images=False)
    with pytest.raises(CocoError, match=message) as info:
        read_instances(root)
    text = str(info.value)
    assert text.startswith(str(root / "annotations" / "instances_val2017.json")) and "\n" not in text


def test_file_level_errors(tmp_path):
    with pytest.raises(CocoError, match="no COCO instances file"):
        read_instances(tmp_path)
    with pytest.raises(CocoError, match="choose one of"):
        read_instances(tmp_path, "test")
    root = _write(tmp_path, _doc(), images=False)
    size = (root / "annotations" / "instances_val2017.json").stat().st_size
    with pytest.raises(CocoError, match=f"{size} bytes, over the cap of 100 \\(max_annotation_bytes\\)"):
        read_instances(root, max_bytes=100)
    (root / "annotations" / "instances_val2017.json").write_text("[1, 2")
    with pytest.raises(CocoError, match="not JSON"):
        read_instances(root)
    (root / "annotations" / "instances_val2017.json").write_text("[]")
    with pytest.raises(CocoError, match="expected a JSON object"):
        read_instances(root)


def test_image_checks_run_on_the_header_before_decoding(tmp_path, monkeypatch):
    from PIL import ImageFile

    doc = _doc()
    root = _write(tmp_path, doc)
    sets = draw_sets(read_instances(root), CocoSetsConfig(views=2))
    assert load_set_images(sets, 8).shape == (1, 2, 3, 8, 8)
    # a pixel bomb behind an honest-looking annotation: a 6000 x 6000 PNG (small on disk) under a 24 x 16 entry
    bomb = root / "val2017" / doc["images"][0]["file_name"]
    Image.new("L", (6000, 6000)).save(bomb, format="PNG")

    def no_decoding(self):  # the header alone must decide
        raise AssertionError("pixels decoded before the size check")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(CocoError, match=r"6000x6000 pixels, over the cap of 16777216 \(max_image_pixels\)"):
        load_set_images(sets, 8)
    monkeypatch.undo()
    small_cap = draw_sets(read_instances(root), CocoSetsConfig(views=2, max_image_pixels=100))
    with pytest.raises(CocoError, match=r"annotated 24x16 pixels, over the cap of 100"):
        load_set_images(small_cap, 8)
    _jpeg(bomb, 30, 16)
    with pytest.raises(CocoError, match="30x16 pixels, but the annotations say 24x16"):
        load_set_images(sets, 8)
    bomb.write_bytes(b"not an image")
    with pytest.raises(CocoError, match="cannot decode image"):
        load_set_images(sets, 8)
    bomb.unlink()
    with pytest.raises(CocoError, match=f"{bomb}: image file missing"):
        load_set_images(sets, 8)


def test_fixture_images_are_real_photographs_in_the_coco_layout(tmp_path):
    root = write_coco_fixture(tmp_path / "coco")
    assert (root / "annotations" / "instances_val2017.json").is_file()
    sets = load_coco_sets(root, "val", CocoSetsConfig())
    images = load_set_images(sets, 16)
    assert images.shape == (len(FIXTURE_CATEGORIES), 4, 3, 16, 16) and images.min() >= -1 and images.max() <= 1
    assert images.std() > 0.1  # photographs, not a flat fill


# ---------------------------------------------------------------------- the library function
@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    return write_coco_fixture(tmp_path_factory.mktemp("coco") / "coco", images_per_category=8)


@pytest.fixture(scope="module")
def scorer(tiny_clip_dir):
    from m2m_pipeline.evaluation.clip_score import ClipScorer

    return ClipScorer(f"local-dir:{tiny_clip_dir}")


def test_coco_zero_shot_end_to_end(tiny_checkpoint, coco_root, scorer, tmp_path):
    sets = load_coco_sets(coco_root, "val", CocoSetsConfig(sets_per_category=2, seed=1))
    spec = CocoZeroShotSpec(sets=sets.config, sampling=FAST, generated_images=2, batch_size=3)
    res = coco_zero_shot(tiny_checkpoint, sets, tmp_path / "out", scorer, spec)
    s = len(sets.sets)
    assert res["real"].shape == (s, 4, 3, 16, 16) and res["generated"].shape == (s, 2, 3, 16, 16)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    clip = report["clip_image_image"]
    assert len(clip["by_position"]) == 2 and len(clip["per_set"]) == s and clip["sets"] == s
    assert set(clip["per_category"]) == {name for _, name, _ in FIXTURE_CATEGORIES}
    for name, row in clip["per_category"].items():
        rows = [i for i, x in enumerate(sets.sets) if x.category == name]
        assert row["sets"] == 2 and row["by_position"] == pytest.approx(np.mean([clip["per_set"][i] for i in rows], 0))
    assert -100 <= clip["other_category"] <= 100 and -100 <= clip["real_vs_real"] <= 100
    # provenance: the exact images, the seeds, the checkpoint, the CLIP model
    assert [s_["image_ids"] for s_ in report["coco"]["sets"]] == [list(x.image_ids) for x in sets.sets]
    assert report["coco"]["config"]["seed"] == 1 and report["sampling"]["seed"] == 0
    assert report["checkpoint"] == str(tiny_checkpoint) and report["clip"]["model"].startswith("local-dir:")
    assert report["coco"]["annotations_sha256"] == sets.index.sha256
    grid = Image.open(res["files"]["grid"])  # 16 px cells scaled x4, 4 real | 2 generated, a row per set
    assert grid.size == (6 * 64 + 4 * 4, s * 64 + (s - 1) * 2 * 4)
    assert "| generated vs real |" in (tmp_path / "out" / "consistency.md").read_text()
    assert not list((tmp_path / "out").glob("*.tmp"))
    # set b samples with seed + b whatever the batching
    one = coco_zero_shot(tiny_checkpoint, sets, tmp_path / "one", None,
                         CocoZeroShotSpec(sets=sets.config, sampling=FAST, generated_images=2, batch_size=1))
    assert torch.allclose(one["generated"], res["generated"], atol=1e-5)
    assert one["clip_image_image"] is None and json.loads(one["report_path"].read_text())["clip"] is None


def test_clip_consistency_identity_and_references(coco_root, scorer):
    """Generated = the real images themselves: position n scores (100 + (V-1) x its real-vs-real) / V, so the
    mean over positions is (100 + (V-1) x real_vs_real) / V exactly; the other-category reference pairs sets of
    different categories."""
    from m2m_pipeline.evaluation.coco_zero_shot import _other_category

    sets = load_coco_sets(coco_root, "val", CocoSetsConfig(sets_per_category=2))
    real = load_set_images(sets, 32)
    v = real.shape[1]
    clip = clip_consistency(scorer, real, real.clone(), sets)
    assert np.mean(clip["by_position"]) == pytest.approx((100 + (v - 1) * clip["real_vs_real"]) / v, abs=1e-3)
    other = _other_category(sets)
    assert all(sets.sets[j].category != sets.sets[i].category for i, j in enumerate(other))
    shuffled = clip_consistency(scorer, real, real[other], sets)
    assert shuffled["mean"] == pytest.approx(clip["other_category"], abs=1e-3)
    assert shuffled["mean"] < clip["mean"]  # a set's own images score above another category's


def test_dino_variant_runs(coco_root, scorer, tmp_path):
    from m2m_pipeline.network import M2MConfig, M2MUNet

    ckpt = tmp_path / "dino"
    M2MUNet(M2MConfig.preset("tiny", variant="dino")).save_pretrained(ckpt)
    sets = load_coco_sets(coco_root, "val", CocoSetsConfig(max_sets=2))
    with pytest.warns(UserWarning, match="does not record its encoders"):
        res = coco_zero_shot(ckpt, sets, tmp_path / "out", scorer,
                             CocoZeroShotSpec(sets=sets.config, sampling=FAST, generated_images=1))
    assert res["variant"] == "dino" and res["generated"].shape == (2, 1, 3, 16, 16)


def test_spec_from_the_profiles_eval_spec():
    from m2m_pipeline.evaluation.report import EVAL_PRESETS

    ev = EVAL_PRESETS["paper"]
    spec = CocoZeroShotSpec.from_eval(ev, seed=5)
    assert (spec.sets.views, spec.sets.max_sets, spec.sets.seed) == (ev.context_images, ev.coco_sets, 5)
    assert (spec.generated_images, spec.sampling.steps, spec.sampling.guidance_scale) == (4, 50, 7.5)
    assert (spec.sampling.window, spec.sampling.anchors, spec.sampling.seed) == (ev.window, ev.anchors, 5)


# ---------------------------------------------------------------------- the CLI and the asset's setting
def test_cli_coco_zero_shot(tiny_checkpoint, coco_root, tiny_clip_dir, tmp_path):
    from click.testing import CliRunner

    from m2m_pipeline.cli import main

    out = tmp_path / "cli"
    args = ["coco-zero-shot", "--checkpoint", str(tiny_checkpoint), "--coco-dir", str(coco_root), "--split", "val",
            "--clip-model", f"local-dir:{tiny_clip_dir}", "--out", str(out), "--preset", "smoke", "--steps", "1",
            "--generated-images", "2", "--sets", "3", "--quiet"]
    r = CliRunner().invoke(main, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "3 sets from 3 categories of val2017" in r.output and "| generated vs real |" in r.output
    report = json.loads((out / "report.json").read_text())
    assert len(report["coco"]["sets"]) == 3 and report["sampling"]["steps"] == 1
    assert report["generated_images"] == 2 and len(report["clip_image_image"]["by_position"]) == 2
    # bad input: one line naming the file and the field
    broken = tmp_path / "broken"
    _write(broken, _broken(lambda d: d["annotations"][5].update(category_id=99)), images=False)
    r = CliRunner().invoke(main, [*args[:4], str(broken), *args[5:]])
    assert r.exit_code != 0 and "annotations[5].category_id: 99 is not in categories" in r.output
    assert "Traceback" not in r.output
    r = CliRunner().invoke(main, [*args, "--category", "unicorn"])
    assert r.exit_code != 0 and "'unicorn' is not in categories" in r.output


def test_settings_coco_dir_is_checked_at_resolve(tmp_path):
    from dagster import Failure

    from m2m_pipeline.orchestration.profiles import PROFILES
    from m2m_pipeline.orchestration.resources import M2MSettings

    with pytest.raises(Failure, match=r"resources\.settings\.config\.coco_dir: no COCO annotations at .*"
                                      r"instances_val2017\.json"):
        M2MSettings(repo_dir=str(tmp_path), coco_dir="data/coco").resolve(PROFILES["smoke"])
    write_coco_fixture(tmp_path / "data" / "coco")
    r = M2MSettings(repo_dir=str(tmp_path), coco_dir="data/coco").resolve(PROFILES["smoke"])
    assert r.coco_dir == tmp_path.resolve() / "data" / "coco" and r.coco_split == "val"
    with pytest.raises(ValueError, match="coco_split"):
        M2MSettings(coco_split="test")
    assert PROFILES["paper"].coco_zero_shot and not PROFILES["smoke"].coco_zero_shot


@pytest.mark.filterwarnings("ignore:.*does not record its encoders")
def test_coco_asset_materializes_both_variants(tmp_path, coco_root):
    """The asset on a profile given COCO (the smoke profile's sizes, so no CLIP is configured): both variants'
    grids in the metadata, files where the layout says."""
    import shutil

    from dagster import materialize

    from m2m_pipeline.network import M2MConfig, M2MUNet
    from m2m_pipeline.orchestration.assets import (
        ProfileGraph,
        coco_zero_shot_asset,
        layout,
    )
    from m2m_pipeline.orchestration.profiles import PROFILES
    from m2m_pipeline.orchestration.resources import (
        ComputeResource,
        DVCResource,
        M2MSettings,
        MLflowResource,
    )

    profile = PROFILES["smoke"].replace(coco_zero_shot=True)
    paths = layout(profile)
    for variant in ("self", "dino"):
        M2MUNet(M2MConfig.preset("tiny", variant=variant)).save_pretrained(
            tmp_path / paths[f"m2m_{variant}_checkpoint"] / "final")
    shutil.copytree(coco_root, tmp_path / "data" / "coco")
    resources = {"settings": M2MSettings(repo_dir=str(tmp_path), coco_dir="data/coco",
                                         eval={"steps": 1, "zero_shot_images": 1, "coco_sets": 2}),
                 "compute": ComputeResource(device="cpu"), "mlflow": MLflowResource(mode="off"),
                 "dvc": DVCResource(mode="off")}
    result = materialize([coco_zero_shot_asset(ProfileGraph.of(profile))], resources=resources)
    assert result.success
    meta = result.asset_materializations_for_node("smoke__coco_zero_shot")[0].metadata
    assert meta["sets"].value == 2
    assert "data:image/png;base64," in meta["fig16_m2m_self"].value and "fig17_m2m_dino" in meta
    for variant in ("self", "dino"):
        report = json.loads((tmp_path / paths["coco_zero_shot"] / f"m2m_{variant}" / "report.json").read_text())
        assert report["variant"] == variant and len(report["coco"]["sets"]) == 2
