"""Feature caches: keyed like their MIS shard, fp16, equal to the encoders' outputs, rebuilt only when stale."""

from __future__ import annotations

import os

import numpy as np
import torch

from m2m_pipeline.data import build_feature_shard, generate_shard, read_manifest, read_samples
from m2m_pipeline.data.features import load_feature_encoders
from m2m_pipeline.data.shards import decode_mis_sample, decode_npy
from m2m_pipeline.data.shapes import uint8_to_images
from m2m_pipeline.data.stable_diffusion import StableDiffusionSetGenerator
from m2m_pipeline.encoders import DinoEncoder, PixelAutoencoder


def test_features_match_encoders_and_keys(tiny_mis, tiny_cfg):
    mis_shard, feature_shard = tiny_mis["mis"] / "mis-000001.tar", tiny_mis["features"] / "mis-000001.tar"
    assert read_manifest(feature_shard)["keys"] == read_manifest(mis_shard)["keys"]
    _, dino = load_feature_encoders(tiny_cfg, device="cpu")
    for raw_mis, raw_features in zip(read_samples([mis_shard]), read_samples([feature_shard])):
        assert raw_mis["__key__"] == raw_features["__key__"]
        images = uint8_to_images(decode_mis_sample(raw_mis).images)  # (25, 3, H, W)
        latents = decode_npy(raw_features, "latents.npy", "", "")
        features = decode_npy(raw_features, "dino.npy", "", "")
        assert latents.dtype == features.dtype == np.float16
        assert latents.shape == (25, 3, 16, 16) and features.shape == (25, dino.num_tokens, dino.hidden_size)
        torch.testing.assert_close(torch.from_numpy(latents).float(), images, atol=2e-3, rtol=0)
        torch.testing.assert_close(torch.from_numpy(features).float(), dino.encode(images), atol=1e-2, rtol=1e-3)
        assert raw_features["caption.txt"] == raw_mis["caption.txt"]
        assert raw_features["attributes.json"] == raw_mis["attributes.json"]


def test_rebuild_is_skipped_and_byte_identical(tiny_mis, tiny_cfg, tmp_path):
    autoencoder, dino = PixelAutoencoder(), DinoEncoder.random(
        image_size=16, patch_size=8, hidden_size=32, num_layers=1, seed=0)
    shard = tiny_mis["mis"] / "mis-000000.tar"
    first = build_feature_shard(shard, tmp_path, autoencoder, dino, tiny_cfg, progress=False, samples_per_chunk=3)
    stamp = os.stat(tmp_path / shard.name).st_mtime_ns
    again = build_feature_shard(shard, tmp_path, autoencoder, dino, tiny_cfg, progress=False)
    assert again["skipped"] and os.stat(tmp_path / shard.name).st_mtime_ns == stamp
    # Chunking and batch size do not change the bytes (fresh dir, other chunking, other batch size).
    other = build_feature_shard(shard, tmp_path / "b", autoencoder, dino, tiny_cfg.replace(feature_batch_size=7),
                                progress=False, samples_per_chunk=1)
    assert other["num_samples"] == first["num_samples"]
    a = [decode_npy(s, "dino.npy", "", "") for s in read_samples([tmp_path / shard.name])]
    b = [decode_npy(s, "dino.npy", "", "") for s in read_samples([tmp_path / "b" / shard.name])]
    assert all(np.abs(x.astype(np.float32) - y.astype(np.float32)).max() <= 2e-3 for x, y in zip(a, b))


def test_sd_shard_reuses_generation_latents(sd_generator: StableDiffusionSetGenerator, sd_captions, tiny_cfg,
                                           tmp_path):
    cfg = tiny_cfg.replace(keep_latents=True, reuse_generation_latents=True, autoencoder="vae")
    generate_shard(0, sd_captions, sd_generator, tmp_path / "mis", cfg, progress=False)

    class MustNotEncode:
        def encode(self, images):
            raise AssertionError("stored SD latents must be reused, not re-encoded")

    dino = DinoEncoder.random(image_size=16, patch_size=8, hidden_size=32, num_layers=1)
    manifest = build_feature_shard(tmp_path / "mis" / "mis-000000.tar", tmp_path / "features", MustNotEncode(),
                                   dino, cfg, progress=False)
    assert manifest["latents_shape"] == [25, 4, 8, 8]
    stored = decode_npy(next(read_samples([tmp_path / "mis" / "mis-000000.tar"])), "latents.npy", "", "")
    cached = decode_npy(next(read_samples([tmp_path / "features" / "mis-000000.tar"])), "latents.npy", "", "")
    assert np.array_equal(stored, cached)
