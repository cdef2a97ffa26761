"""The Fig. 9 measurement runs, covers every method and context size, and its ratios use the same run's SD."""

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
