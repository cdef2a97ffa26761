"""Study helpers: real-photo sets from scikit-image's bundled files, context-count sweep, figures."""

import torch

from m2m_pipeline.evaluation.figures import line_plot
from m2m_pipeline.evaluation.studies import (
    SamplingSpec,
    context_count_sweep,
    real_photo_sets,
)
from m2m_pipeline.network import M2MConfig, M2MUNet


def test_real_photo_sets_any_mode_to_rgb():
    sets, names = real_photo_sets(16, views=3, names=("camera", "chelsea", "logo"))  # grey, RGB, RGBA
    assert sets.shape == (3, 3, 3, 16, 16) and names == ["camera", "chelsea", "logo"]
    assert sets.min() >= -1 and sets.max() <= 1
    assert not torch.equal(sets[1, 0], sets[1, 1])  # different crops of one photo
    again, _ = real_photo_sets(16, views=3, names=("camera", "chelsea", "logo"))
    assert torch.equal(sets, again)  # seeded


def test_context_count_sweep_uses_same_seeds():
    torch.manual_seed(0)
    net = M2MUNet(M2MConfig.preset("tiny", "self")).eval()
    ctx = torch.randn(2, 4, 3, 16, 16)
    spec = SamplingSpec(steps=2, guidance_scale=2.0)
    out = context_count_sweep(net, ctx, spec, counts=(1, 4))
    assert set(out) == {1, 4} and out[1].shape == (2, 1, 3, 16, 16)
    assert not torch.equal(out[1], out[4])  # more preceding images change the result ...
    assert torch.equal(out[1], context_count_sweep(net, ctx, spec, counts=(1,))[1])  # ... nothing else does


def test_line_plot_writes_png(tmp_path):
    path = line_plot({"a": ([1, 2, 3], [0.1, 0.5, 0.9])}, tmp_path / "p.png", title="t", xlabel="x", ylabel="y",
                     hlines={"chance": 0.125})
    assert path.read_bytes()[:4] == b"\x89PNG"
