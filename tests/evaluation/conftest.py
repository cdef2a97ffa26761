"""Shared fixtures for the evaluation tests: a quickly trained 16 px oracle (seconds, not the full recipe)."""

from __future__ import annotations

import pytest

from m2m_pipeline.evaluation.oracle import AttributeOracle, train_oracle


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models on a shared 2-core machine: one torch thread measured 7x faster than two (0.7 s vs 5.1 s
    for a tiny-preset generate call under load)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


QUICK = {"train_images": 3000, "heldout_images": 500, "epochs": 4}  # ~5-10 s; full recipe: test_oracle_full_accuracy


@pytest.fixture(scope="session")
def quick_oracle_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("oracle") / "oracle16"
    train_oracle(16, out_dir=out, progress=False, min_accuracy=None, **QUICK)
    return out


@pytest.fixture(scope="session")
def quick_oracle(quick_oracle_dir) -> AttributeOracle:
    return AttributeOracle.load(quick_oracle_dir)


TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    """A random-weight open_clip model in the 'local-dir:' layout users give for their own weights."""
    import json

    import open_clip
    import torch
    from safetensors.torch import save_file

    out = tmp_path_factory.mktemp("clip") / "tiny-clip"
    out.mkdir()
    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY_CLIP)
    (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "open_clip_model.safetensors"))
    return out


@pytest.fixture(scope="session")
def tiny_test_split(tmp_path_factory):
    """Feature shards of the tiny preset's *test* split (shapes world, 16 px, attributes included)."""
    from m2m_pipeline.data import get_preset
    from m2m_pipeline.data.procedural import build_procedural_mis

    root = tmp_path_factory.mktemp("tiny-test-split")
    features = build_procedural_mis(get_preset("tiny"), root, splits=["test"], progress=False, device="cpu")["test"]
    assert sorted(features.glob("*.tar")), "tiny preset has no test sets"
    return features


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """An untrained tiny M2M-Self checkpoint: the protocol must run end to end on it."""
    from m2m_pipeline.network import M2MConfig, M2MUNet

    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    torch_seed = 0
    import torch

    torch.manual_seed(torch_seed)
    M2MUNet(M2MConfig.preset("tiny")).save_pretrained(out)
    return out
