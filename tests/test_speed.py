"""The Fig. 9 measurement runs, covers every method and context size, and its ratios use the same run's SD."""

import pytest

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
    assert set(by) == {"baseline", "dino", "dino-online", "self"} and by["baseline"].ratio_to_baseline == 1.0
    assert all(r.seconds_per_step > 0 and r.images_per_second > 0 for r in rows)
    # the baseline is the same U-Net less every cross-attention sub-layer, so it is strictly smaller
    assert by["baseline"].parameters < by["self"].parameters
    plain = PlainUNet(M2MConfig.preset("tiny"))
    assert not [m for m in plain.modules() if getattr(m, "attn2", "absent") not in (None, "absent")]
    assert "ratio to baseline" in format_training_table(rows)


@pytest.mark.slow
def test_gpu_check_runs_its_small_shape_path(tmp_path):
    """benchmarks/gpu_check.py end to end on CPU at small shapes (the same code the GPU day runs at paper
    shapes): one table, FLOPs counted on every training method, the batched MIS generator timed."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "gpu_check.json"
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"
    proc = subprocess.run([sys.executable, str(script), "--preset", "tiny-latent", "--layout", "small",
                           "--resolution", "64", "--steps", "2", "--device", "cpu", "--dtype", "float32",
                           "--sampling-steps", "2", "--generated", "1", "--repeats", "1", "--captions", "1",
                           "--naive-images", "1", "--contexts", "2", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert [r["method"] for r in report["training"]] == ["baseline", "dino", "dino-online", "self"]
    assert all(r["flops_per_step"] > 0 and r["seconds_per_step"] > 0 for r in report["training"])
    # M2M-Self runs its context through the U-Net too: more FLOPs than the plain U-Net per step
    assert report["training"][2]["flops_per_step"] > report["training"][0]["flops_per_step"]
    assert {r["method"] for r in report["sampling"]} == {"sd", "dino", "self_cached", "self_uncached"}
    assert report["mis"]["batched_images_per_second"] > 0 and "| MIS 64 px" in proc.stdout
