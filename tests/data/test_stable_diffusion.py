"""StableDiffusionSetGenerator on a tiny random SD pipeline saved locally (Sec. 4 / design-notes 9)."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import torch

from m2m_pipeline.data import generate_shard, get_preset
from m2m_pipeline.data.stable_diffusion import StableDiffusionSetGenerator, initial_noise



def test_defaults_are_the_papers(tiny_sd_path):
    generator = StableDiffusionSetGenerator.from_pretrained(tiny_sd_path, device="cpu")
    params = generator.generation_params()
    assert type(generator.pipeline.scheduler).__name__ == "EulerDiscreteScheduler"
    assert (params["scheduler"], params["guidance_scale"], params["num_inference_steps"], params["height"]) == (
        "EulerDiscreteScheduler", 7.5, 50, 512)
    assert generator.images_per_set == 25
    paper = get_preset("paper")
    assert (paper.guidance_scale, paper.num_inference_steps, paper.resolution, paper.scheduler) == (
        7.5, 50, 512, "EulerDiscreteScheduler")


def test_25_distinct_images_and_single_image_regeneration(sd_generator, sd_captions):
    sets = sd_generator.generate(sd_captions)
    assert [s.key for s in sets] == ["aaaa0001", "aaaa0002"]
    for image_set in sets:
        assert image_set.images.shape == (25, 3, 16, 16) and image_set.latents.shape == (25, 4, 8, 8)
        flat = image_set.latents.flatten(1)
        distances = torch.cdist(flat, flat) + torch.eye(25) * 1e9
        assert distances.min() > 1e-2, "every image of a set must come from its own noise"
    for caption_index, image_index in [(1, 7), (0, 24)]:
        alone = sd_generator.generate([sd_captions[caption_index]], indices=[image_index])[0]
        assert alone.seeds == [sets[caption_index].seeds[image_index]]
        diff = (alone.latents[0] - sets[caption_index].latents[image_index]).abs().max().item()
        assert diff <= 1e-5, f"regenerated latent differs by {diff}"


def test_text_embedding_computed_once_per_caption(sd_generator, sd_captions, monkeypatch):
    calls = []
    forward = sd_generator.pipeline.text_encoder.forward

    def spy(input_ids, *args, **kwargs):
        calls.append(input_ids.shape[0])
        return forward(input_ids, *args, **kwargs)

    monkeypatch.setattr(sd_generator.pipeline.text_encoder, "forward", spy)
    sd_generator.generate(sd_captions)
    assert calls == [2, 2], "one text-encoder pass for the captions, one for the empty negative prompt"


def test_noise_is_per_image_and_device_independent():
    a = initial_noise([1, 2, 3], (4, 8, 8))
    b = initial_noise([3], (4, 8, 8))
    assert torch.equal(a[2], b[0]) and not torch.equal(a[0], a[1])


def test_shard_records_generation_parameters_and_latents(sd_generator, sd_captions, tiny_cfg, tmp_path):
    cfg = tiny_cfg.replace(keep_latents=True, captions_per_batch=2)
    manifest = generate_shard(0, sd_captions, sd_generator, tmp_path, cfg, progress=False)
    assert manifest["generation"]["scheduler"] == "EulerDiscreteScheduler"
    assert manifest["generation"]["guidance_scale"] == 7.5
    with tarfile.open(tmp_path / "mis-000000.tar") as tar:
        params = json.load(tar.extractfile("aaaa0002.gen.json"))
        latents = np.load(io.BytesIO(tar.extractfile("aaaa0002.latents.npy").read()))
        names = tar.getnames()
    assert params["scheduler"] == "EulerDiscreteScheduler" and params["guidance_scale"] == 7.5
    assert params["num_inference_steps"] == 4 and len(params["seeds"]) == 25 and params["indices"] == list(range(25))
    assert latents.dtype == np.float16 and latents.shape == (25, 4, 8, 8)
    assert sum(n.startswith("aaaa0002.") and n.endswith(".png") for n in names) == 25
