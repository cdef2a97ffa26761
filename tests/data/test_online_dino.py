"""The online DINO store (MISConfig.dino_features="online"): images in the feature shard instead of tokens, encoded
by the training step, giving M2M-DINO the same context as the cached tokens."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from m2m_pipeline.data import build_feature_shards, make_loader, read_manifest, read_samples
from m2m_pipeline.data.errors import ShardError
from m2m_pipeline.data.features import cache_dino_features, load_feature_encoders
from m2m_pipeline.data.validators import validate_feature_shard
from m2m_pipeline.network import M2MConfig
from m2m_pipeline.training import TrainConfig, context_of, train


@pytest.fixture(scope="module")
def online(tiny_mis, tiny_cfg, tmp_path_factory):
    out = tmp_path_factory.mktemp("online-features")
    cfg = tiny_cfg.replace(dino_features="online")
    build_feature_shards(tiny_mis["mis"], out, cfg, device="cpu", progress=False)
    return out, cfg


def test_online_shard_holds_the_mis_images_byte_for_byte_and_no_tokens(online, tiny_mis):
    out, _ = online
    name = "mis-000000.tar"
    manifest = read_manifest(out / name)
    assert manifest["dino_features"] == "online" and manifest["dino_shape"] is None
    assert manifest["keys"] == read_manifest(tiny_mis["mis"] / name)["keys"]
    for mis, features in zip(read_samples([tiny_mis["mis"] / name]), read_samples([out / name])):
        images = sorted(k for k in mis if k.endswith(".png"))
        assert len(images) == 25 and "dino.npy" not in features
        assert all(features[k] == mis[k] for k in images)  # copied, not re-encoded
    check = validate_feature_shard(out / name)
    assert check.passed, check.errors
    assert cache_dino_features([out / name]) == "online"
    assert cache_dino_features([tiny_mis["features"] / name]) == "cache"
    with pytest.raises(ShardError, match="mix DINO stores"):
        cache_dino_features([out / name, tiny_mis["features"] / "mis-000001.tar"])


def test_online_context_equals_the_cached_tokens(online, tiny_mis, tiny_cfg):
    """Same seed, same draw: the images the loader decodes, encoded by the recorded encoder, are the cached
    tokens of the same N - 1 context images (fp16 rounding apart); image N is not decoded."""
    out, _ = online
    _, dino = load_feature_encoders(tiny_cfg, device="cpu")
    kwargs = dict(n_images=5, batch_size=4, seed=3, shuffle_buffer=0)
    cached = next(iter(make_loader(tiny_mis["features"], **kwargs)))
    fresh = next(iter(make_loader(out, **kwargs)))
    assert cached["key"] == fresh["key"] and torch.equal(cached["indices"], fresh["indices"])
    assert torch.equal(cached["latents"], fresh["latents"])
    assert fresh["images"].shape == (4, 4, 3, 16, 16) and "dino" not in fresh
    tokens = context_of(fresh, "dino", dino)  # (B, N - 1, S, D)
    torch.testing.assert_close(tokens, cached["dino"][:, :4], atol=1e-2, rtol=1e-3)
    with pytest.raises(ValueError, match="online store"):
        context_of(fresh, "dino", None)


def test_training_on_the_online_store_matches_the_cache(online, tiny_mis, tmp_path):
    """One train() on each store, same seeds: the recorded encoders are the same and the losses agree to the
    fp16 rounding of the cached tokens."""
    out, _ = online
    net_config = M2MConfig.preset("tiny", "dino")
    tc = dataclasses.replace(TrainConfig.preset("tiny"), steps=4, checkpoint_every=0, batch_size=2)
    a = train(net_config, tc, tiny_mis["features"], tmp_path / "cache", progress=False, device="cpu")
    b = train(net_config, tc, out, tmp_path / "online", progress=False, device="cpu")
    np.testing.assert_allclose(a.losses, b.losses, rtol=1e-3)
    spec = [json.loads((r.checkpoint_dir / "config.json").read_text())["encoder_spec"] for r in (a, b)]
    assert spec[0] == spec[1] and spec[0]["dino_random"] is not None


def test_a_sample_without_tokens_or_images_names_shard_and_key():
    import io
    import random

    from m2m_pipeline.data.loader import to_example

    buf = io.BytesIO()
    np.save(buf, np.zeros((25, 3, 16, 16), np.float16))
    sample = {"__url__": "features/mis-000007.tar", "__key__": "k42", "latents.npy": buf.getvalue()}
    with pytest.raises(ShardError, match=r"mis-000007\.tar.*k42.*neither 'dino.npy' nor images"):
        to_example(sample, 5, random.Random(0))
