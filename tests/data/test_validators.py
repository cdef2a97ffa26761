"""Validators and loader on corrupt or truncated shards: clear errors naming the shard and sample key."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest

from m2m_pipeline.data import (
    ShardError,
    build_feature_shard,
    make_loader,
    read_manifest,
    validate_caption_table,
    validate_feature_shard,
    validate_mis_shard,
)
from m2m_pipeline.data.shards import DeterministicTarWriter, dump_fp16
from m2m_pipeline.io import atomic_open
from m2m_pipeline.encoders import PixelAutoencoder


def member_offset(data: bytes, name: str) -> int:
    """Byte offset of a member's data in an uncompressed tar (its 512-byte header precedes it)."""
    return data.index(name.encode()) + 512


def first_keys(shard) -> list[str]:
    return read_manifest(shard)["keys"]


def test_valid_build_passes(tiny_mis):
    for shard in sorted(tiny_mis["mis"].glob("*.tar")):
        result = validate_mis_shard(shard)
        assert result.passed, result.errors
        assert result.details["samples"] == read_manifest(shard)["num_samples"]
    for shard in sorted(tiny_mis["features"].glob("*.tar")):
        result = validate_feature_shard(shard)
        assert result.passed, result.errors
        assert result.details["latents_shape"] == (25, 3, 16, 16)
    assert validate_caption_table(tiny_mis["table"]).passed


@pytest.fixture
def copy_of(tiny_mis, tmp_path):
    def copy(kind: str):
        out = tmp_path / kind
        shutil.copytree(tiny_mis[kind], out)
        return out / "mis-000000.tar"
    return copy


def test_corrupt_image_named_by_validator_and_reader(copy_of, tiny_cfg):
    shard = copy_of("mis")
    key = first_keys(shard)[1]
    data = bytearray(shard.read_bytes())
    start = member_offset(data, f"{key}.07.png")
    data[start + 8 : start + 40] = b"\0" * 32  # clobber the PNG's IHDR
    shard.write_bytes(bytes(data))
    result = validate_mis_shard(shard)
    assert not result.passed
    assert any(str(shard) in e and repr(key) in e and "07.png" in e for e in result.errors), result.errors
    assert any("sha256" in e for e in result.errors)
    # The reader that consumes MIS shards (the feature builder) names it too, and writes nothing.
    with pytest.raises(ShardError) as caught:
        build_feature_shard(shard, shard.parent / "features", PixelAutoencoder(), PixelAutoencoder(), tiny_cfg,
                            progress=False)
    assert caught.value.shard == str(shard) and caught.value.key == key and "07.png" in str(caught.value)
    assert not list((shard.parent / "features").glob("*"))


def test_truncated_shard_named_by_validator_and_loader(copy_of):
    for kind in ("mis", "features"):
        shard = copy_of(kind)
        key = first_keys(shard)[2]
        data = shard.read_bytes()
        member = f"{key}.latents.npy" if kind == "features" else f"{key}.12.png"
        shard.write_bytes(data[: member_offset(data, member) + 40])  # cut inside that member's data
        validate = validate_mis_shard if kind == "mis" else validate_feature_shard
        result = validate(shard)
        assert not result.passed
        assert any(str(shard) in e and repr(key) in e and "truncated" in e for e in result.errors), result.errors
        if kind == "features":
            loader = make_loader(shard, n_images=5, shuffle_buffer=0)
            with pytest.raises(ShardError) as caught:
                list(loader)
            assert caught.value.shard == str(shard) and caught.value.key == key
            assert "truncated" in str(caught.value)


def test_shard_cut_at_a_sample_boundary_caught_via_manifest(copy_of):
    shard = copy_of("features")
    keys = first_keys(shard)
    data = shard.read_bytes()
    shard.write_bytes(data[: member_offset(data, f"{keys[2]}.attributes.json") - 512])
    result = validate_feature_shard(shard)
    assert not result.passed and any("missing keys" in e and keys[2] in e for e in result.errors)
    with pytest.raises(ShardError, match=rf"mis-000000.tar: sample '{keys[1]}': shard ends after 2 samples"):
        list(make_loader(shard, shuffle_buffer=0))


def test_corrupt_feature_array_named_by_loader(copy_of):
    shard = copy_of("features")
    key = first_keys(shard)[0]
    data = bytearray(shard.read_bytes())
    start = member_offset(data, f"{key}.dino.npy")
    data[start : start + 6] = b"NOTNPY"
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError) as caught:
        list(make_loader(shard, shuffle_buffer=0))
    assert caught.value.key == key and "dino.npy" in str(caught.value) and str(shard) in str(caught.value)
    result = validate_feature_shard(shard)
    assert any(repr(key) in e and "dino.npy" in e for e in result.errors)


def test_feature_validator_catches_nan_dtype_and_shape(tmp_path):
    shard = tmp_path / "f.tar"
    good = np.zeros((25, 3, 4, 4), np.float32)
    with atomic_open(shard) as handle, DeterministicTarWriter(handle) as writer:
        writer.write({"__key__": "ok", "latents.npy": dump_fp16(good), "dino.npy": dump_fp16(np.zeros((25, 5, 8)))})
        nan = good.copy()
        nan[3, 0, 0, 0] = np.nan
        writer.write({"__key__": "nan", "latents.npy": dump_fp16(nan), "dino.npy": dump_fp16(np.zeros((25, 5, 8)))})
        buffer = io.BytesIO()
        np.save(buffer, np.zeros((25, 5, 8), np.float32))
        writer.write({"__key__": "fp32", "latents.npy": dump_fp16(good), "dino.npy": buffer.getvalue()})
        writer.write({"__key__": "shape", "latents.npy": dump_fp16(good[:, :, :2]),
                      "dino.npy": dump_fp16(np.zeros((25, 5, 8)))})
    result = validate_feature_shard(shard)
    text = "\n".join(result.errors)
    assert not result.passed
    assert "'nan': latents.npy contains NaN" in text
    assert "'fp32': dino.npy has dtype float32" in text
    assert "'shape': latents.npy has shape (25, 3, 2, 4)" in text
    assert "no manifest" in text


def test_caption_validator_recounts_tokens(tmp_path):
    import json

    row = {"id": "x1", "caption": " ".join(["a"] * 80), "url": "u", "tokens": 10, "split": "train",
           "source": "f.tsv:3"}
    (tmp_path / "t.jsonl").write_text(json.dumps(row) + "\n")
    result = validate_caption_table(tmp_path / "t.jsonl")
    assert not result.passed
    assert any("'x1' (f.tsv:3): 82 CLIP tokens > 77" in e for e in result.errors)
