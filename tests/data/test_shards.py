"""MIS shards: byte-reproducible, atomic, idempotent and resumable (design-notes 11)."""

from __future__ import annotations

import os
import tarfile

import pytest

from m2m_pipeline.data import MISDataError, ShapesSetGenerator, generate_shard, read_manifest, read_samples
from m2m_pipeline.io import sha256_file


class FailingGenerator:
    """Delegates to a real generator and raises after `fail_after` sets: a worker dying mid-shard."""

    def __init__(self, inner, fail_after: int):
        self.inner, self.fail_after, self.done = inner, fail_after, 0
        self.images_per_set = inner.images_per_set

    def generation_params(self):
        return self.inner.generation_params()

    def generate(self, captions, indices=None):
        sets = []
        for caption in captions:
            if self.done == self.fail_after:
                raise RuntimeError("simulated crash mid-shard")
            sets.extend(self.inner.generate([caption], indices))
            self.done += 1
        return sets


@pytest.fixture
def generator():
    return ShapesSetGenerator(resolution=16)


@pytest.fixture
def cfg(tiny_cfg):
    return tiny_cfg.replace(captions_per_batch=2)


def keys_in(path) -> list[str]:
    return [s["__key__"] for s in read_samples([path])]


def test_identical_inputs_give_identical_bytes(shapes_captions, generator, cfg, tmp_path):
    a = generate_shard(3, shapes_captions, generator, tmp_path / "a", cfg, progress=False)
    b = generate_shard(3, shapes_captions, ShapesSetGenerator(resolution=16), tmp_path / "b", cfg, progress=False)
    assert (tmp_path / "a" / "mis-000003.tar").read_bytes() == (tmp_path / "b" / "mis-000003.tar").read_bytes()
    assert a["sha256"] == b["sha256"] == sha256_file(tmp_path / "a" / "mis-000003.tar")
    assert a["num_samples"] == 5 and a["keys"] == [c.id for c in shapes_captions]
    with tarfile.open(tmp_path / "a" / "mis-000003.tar") as tar:
        assert {(m.mtime, m.uname, m.uid) for m in tar.getmembers()} == {(0, "mis", 0)}


def test_interrupted_shard_reruns_to_identical_bytes(shapes_captions, generator, cfg, tmp_path):
    reference = generate_shard(0, shapes_captions, generator, tmp_path / "ref", cfg, progress=False)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated crash"):
        generate_shard(0, shapes_captions, FailingGenerator(generator, fail_after=3), out, cfg, progress=False)
    assert not (out / "mis-000000.tar").exists() and not (out / "mis-000000.json").exists()
    assert not list(out.glob("*.tmp")), "the partial temp file is cleaned up"
    manifest = generate_shard(0, shapes_captions, generator, out, cfg, progress=False)
    assert manifest["skipped"] is False and manifest["sha256"] == reference["sha256"]
    assert (out / "mis-000000.tar").read_bytes() == (tmp_path / "ref" / "mis-000000.tar").read_bytes()
    keys = keys_in(out / "mis-000000.tar")
    assert keys == [c.id for c in shapes_captions] and len(set(keys)) == len(keys)


def test_killed_worker_leftovers_are_redone(shapes_captions, generator, cfg, tmp_path):
    """A SIGKILL leaves a temp file (and maybe a tar without manifest): both are redone, not trusted."""
    reference = generate_shard(0, shapes_captions, generator, tmp_path / "ref", cfg, progress=False)
    out = tmp_path / "run"
    out.mkdir()
    (out / ".mis-000000.tar.abc123.tmp").write_bytes(b"partial")
    (out / "mis-000000.tar").write_bytes((tmp_path / "ref" / "mis-000000.tar").read_bytes()[:5000])
    manifest = generate_shard(0, shapes_captions, generator, out, cfg, progress=False)
    assert manifest["skipped"] is False and manifest["sha256"] == reference["sha256"]
    assert not list(out.glob("*.tmp"))


def test_complete_shard_is_skipped(shapes_captions, generator, cfg, tmp_path):
    generate_shard(0, shapes_captions, generator, tmp_path, cfg, progress=False)
    stamp = os.stat(tmp_path / "mis-000000.tar").st_mtime_ns
    again = generate_shard(0, shapes_captions, FailingGenerator(generator, 0), tmp_path, cfg, progress=False)
    assert again["skipped"] is True and os.stat(tmp_path / "mis-000000.tar").st_mtime_ns == stamp


def test_changed_bytes_are_regenerated(shapes_captions, generator, cfg, tmp_path):
    first = generate_shard(0, shapes_captions, generator, tmp_path, cfg, progress=False)
    data = bytearray((tmp_path / "mis-000000.tar").read_bytes())
    data[2000] ^= 0xFF
    (tmp_path / "mis-000000.tar").write_bytes(bytes(data))
    again = generate_shard(0, shapes_captions, generator, tmp_path, cfg, progress=False)
    assert again["skipped"] is False and sha256_file(tmp_path / "mis-000000.tar") == first["sha256"]


def test_different_request_needs_overwrite(shapes_captions, generator, cfg, tmp_path):
    generate_shard(0, shapes_captions, generator, tmp_path, cfg, progress=False)
    with pytest.raises(MISDataError, match="mis-000000.tar: exists with a manifest for different captions"):
        generate_shard(0, shapes_captions[:3], generator, tmp_path, cfg, progress=False)
    manifest = generate_shard(0, shapes_captions[:3], generator, tmp_path, cfg, progress=False, overwrite=True)
    assert manifest["num_samples"] == 3 and read_manifest(tmp_path / "mis-000000.tar")["num_samples"] == 3


def test_jpeg_shards_and_bad_keys(shapes_captions, generator, cfg, tmp_path):
    manifest = generate_shard(0, shapes_captions[:2], generator, tmp_path, cfg.replace(image_format="jpeg"),
                              progress=False)
    sample = next(read_samples([tmp_path / "mis-000000.tar"]))
    assert manifest["image_format"] == "jpeg" and "00.jpg" in sample and "24.jpg" in sample
    from m2m_pipeline.data import Caption

    with pytest.raises(MISDataError, match="must not contain '.'"):
        generate_shard(1, [Caption("a.b", "a red circle on a plain black background")], generator, tmp_path, cfg,
                       progress=False)
