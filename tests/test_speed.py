"""The Fig. 9 measurement runs, covers every method and context size, and its ratios use the same run's SD."""

from m2m_pipeline.network import M2MConfig
from m2m_pipeline.speed import METHODS, format_table, measure_sampling_speed, plot_speed


def test_speed_rows_and_plot(tmp_path):
    rows = measure_sampling_speed("tiny", (1, 2), steps=2, generated=1, repeats=1, device="cpu")
    assert {(r.method, r.context) for r in rows} == {("sd", 0)} | {(m, n) for m in METHODS[1:] for n in (1, 2)}
    sd = next(r for r in rows if r.method == "sd")
    assert sd.ratio_to_sd == 1.0
    for r in rows:
        assert r.seconds_per_image > 0
        assert abs(r.ratio_to_sd - r.seconds_per_image / sd.seconds_per_image) < 1e-12
    assert "Self uncached" in format_table(rows)
    path = plot_speed(rows, tmp_path / "fig9.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_training_throughput_rows_and_a_baseline_without_image_set_attention():
    from m2m_pipeline.speed import PlainUNet, format_training_table, measure_training_throughput

    rows = measure_training_throughput("tiny", batch_size=1, n_images=2, repeats=1, device="cpu")
    by = {r.method: r for r in rows}
    assert set(by) == {"baseline", "dino", "self"} and by["baseline"].ratio_to_baseline == 1.0
    assert all(r.seconds_per_step > 0 and r.images_per_second > 0 for r in rows)
    # the baseline is the same U-Net less every cross-attention sub-layer, so it is strictly smaller
    assert by["baseline"].parameters < by["self"].parameters
    plain = PlainUNet(M2MConfig.preset("tiny"))
    assert not [m for m in plain.modules() if getattr(m, "attn2", "absent") not in (None, "absent")]
    assert "ratio to baseline" in format_training_table(rows)
