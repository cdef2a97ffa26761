"""`make paper-dryrun`: every stage of the Dagster paper job, through the job's own code path, on random weights
in the released folder layouts, for a handful of captions (docs/orchestration.md "The paper job, dry").

    python -m m2m_pipeline.orchestration.dryrun --out runs/paper-dryrun               # full scale, ~20 GiB
    python -m m2m_pipeline.orchestration.dryrun --out /tmp/dry --scale small          # CI's small shapes

What it does:
1. writes random-weight folders laid out like stabilityai/stable-diffusion-2-1-base and facebook/dinov2-giant
   (`m2m_pipeline.reference_layouts`; "small": the same layouts and the paper's 512 px, narrow networks);
2. writes a CC12M-style caption TSV of four captions (train 1, validation 1, test 2);
3. runs each op of `m2m_paper_job` (captions -> MIS -> features -> both checkpoints -> oracle -> both
   evaluation reports -> learnability -> sampling benchmark) with `execute_in_process(op_selection=[op])` —
   Dagster's in-process executor instead of the k8s one, the paper run config's resources otherwise — each in
   its own child process, so its peak memory is its own;
4. prints one table: stage, seconds, peak resident memory (and peak CUDA memory on a GPU).

What the run config changes for a dry run (`dryrun_run_config`): one SD sampling step and 6 images per set
(N = 5 must fit), one training step of one set (global batch 1), the `dryrun` EvalSpec (one set, one DDIM
step), MLflow in a local SQLite store under `--out`, DVC off (the paper profile versions nothing yet). Nothing
it prints is a result: the weights are random. The run's events stay in `--out/.state/dagster` (`dagster dev`
with DAGSTER_HOME there shows them).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PROFILE = "paper"
JOB = f"m2m_{PROFILE}_job"
PREPARE = "weights + data"  # the random-weight folders in the released layouts and the data fixtures
SD_DIR, DINO_DIR, CAPTIONS = "models/stable-diffusion-2-1-base", "models/dinov2-giant", "data/cc12m/*.tsv"


def job_stages() -> list[str]:
    """Every op of `m2m_paper_job`, in the job's topological order (asset keys paper/<name>; the feature caches
    are one multi-asset op). The dry run runs all of them: nothing is listed by hand, so a new asset of the
    paper profile is in the dry run the moment it is in the job."""
    from m2m_pipeline.definitions import defs

    graph = defs.resolve_job_def(JOB).graph
    return [node.name.removeprefix(f"{PROFILE}__") for node in graph.nodes_in_topological_order]


# Captions per split: FID needs two sets a side, so the test split gets two.
SPLIT_SIZES = {"train": 1, "validation": 1, "test": 2}

# Ordinary real-world captions in CC12M's style (never the shapes grammar: the paper profile's evaluation must
# not depend on it). Subject x scene x style gives 21,000 distinct captions, enough to find a test caption at the
# paper's 0.1 % test fraction by the filter's own hash.
_SUBJECTS = ("a golden retriever", "an old man", "a red vintage car", "a bowl of ramen", "a wooden cabin",
             "two children", "a cup of coffee", "a white sailboat", "a tabby cat", "a bicycle", "a young woman",
             "a plate of pasta", "a lighthouse", "a bouquet of tulips", "an elephant", "a pair of sneakers",
             "a city bus", "a chocolate cake", "a brown horse", "a stone bridge", "a laptop", "a hot air balloon",
             "a street musician", "a glass of red wine", "a mountain goat", "a steam train", "a wedding couple",
             "a green parrot", "a vegetable garden", "a leather armchair", "a fishing boat", "a snowman",
             "a skateboarder", "a basket of apples", "a yellow taxi")
_SCENES = ("on a sandy beach", "in a busy market", "at sunset", "in the snow", "next to a lake", "in a modern kitchen",
           "on a rainy street", "in a pine forest", "under a clear blue sky", "in front of a brick wall",
           "on a wooden table", "in the desert", "at a train station", "in a flower field", "on a mountain road",
           "inside a cozy living room", "near the harbour", "in a city park", "at night with neon lights",
           "on a farm", "by the river", "in an art gallery", "on a rooftop", "in the fog", "at the airport",
           "in a library", "on a frozen lake", "at a street festival", "in autumn leaves", "under a bridge")
_STYLES = ("", "close-up photo of ", "aerial view of ", "black and white photo of ", "watercolor painting of ",
           "stock photo of ", "vintage photograph of ", "illustration of ", "wide angle shot of ", "cartoon of ",
           "portrait of ", "blurry photo of ", "professional photo of ", "sketch of ", "3d render of ",
           "postcard of ", "oil painting of ", "snapshot of ", "poster of ", "macro photo of ")


def realworld_captions() -> list[str]:
    """Every caption of the dry run's vocabulary, in a fixed order."""
    return [f"{style}{subject} {scene}".strip().capitalize() if style else f"{subject} {scene}".capitalize()
            for style in _STYLES for subject in _SUBJECTS for scene in _SCENES]


def split_captions(test_fraction: float, validation_fraction: float) -> list[str]:
    """SPLIT_SIZES real-world captions per split, found by the same hash the caption filter splits on."""
    from m2m_pipeline.data.captions import caption_hash, split_of
    from m2m_pipeline.data.tokens import normalise_caption

    found: dict[str, list[str]] = {split: [] for split in SPLIT_SIZES}
    for text in realworld_captions():
        split = split_of(caption_hash(normalise_caption(text)), test_fraction, validation_fraction)
        if len(found[split]) < SPLIT_SIZES[split]:
            found[split].append(text)
        if all(len(found[s]) == n for s, n in SPLIT_SIZES.items()):
            return [text for split in SPLIT_SIZES for text in found[split]]
    raise RuntimeError(f"too few captions per split in the dry run's vocabulary: {found}")


# Where the dry run writes what the paper run config names (paths relative to the dry run's repo root)
INCEPTION_DIR = "models/inception"  # clean-fid's file inception-2015-12-05.pt inside
CLIP_DIR = "models/clip/dryrun"
COCO_DIR, OBJAVERSE_DIR, VGSI_DIR, DVC_DIR = "data/coco", "data/objaverse", "data/vgsi", ".state/dvc"


def prepare(root: Path, scale: str) -> None:
    """The weight folders and the data fixtures under `root` (each kept if already there)."""
    from m2m_pipeline.data.config import get_preset
    from m2m_pipeline.reference_layouts import build_dinov2_giant, build_sd21_base

    if not (root / SD_DIR / "model_index.json").exists():
        build_sd21_base(root / SD_DIR, scale=scale)
    if not (root / DINO_DIR / "config.json").exists():
        build_dinov2_giant(root / DINO_DIR, scale=scale)
    _prepare_scorers(root, scale)
    mis = get_preset(PROFILE)
    tsv = root / "data" / "cc12m" / "part-00000.tsv"
    tsv.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"https://example.invalid/{i}.jpg\t{text}\n"
             for i, text in enumerate(split_captions(mis.test_fraction, mis.validation_fraction))]
    tsv.write_text("".join(lines))
    _prepare_task_data(root)
    from m2m_pipeline.orchestration.dvc_pointers import local_pointer_config

    local_pointer_config(root / DVC_DIR)


def _prepare_scorers(root: Path, scale: str) -> None:
    """Inception (clean-fid's TorchScript file) and CLIP (open_clip) on random weights, in their released layouts;
    CLIP's settings (model name or local-dir, weights file) are recorded beside it for the run config."""
    from m2m_pipeline.evaluation.fid import INCEPTION_FILE
    from m2m_pipeline.reference_layouts import build_inception, build_open_clip

    if not (root / INCEPTION_DIR / INCEPTION_FILE).exists():
        build_inception(root / INCEPTION_DIR, scale=scale)
    if not (root / CLIP_DIR / "settings.json").exists():
        clip = build_open_clip(root / CLIP_DIR, scale=scale)
        settings = {"clip_model": clip.model,
                    "clip_pretrained": None if clip.pretrained is None else str(Path(clip.pretrained).relative_to(root))}
        (root / CLIP_DIR / "settings.json").write_text(json.dumps(settings) + "\n")


def _clip_settings(root: Path) -> dict[str, Any]:
    return json.loads((root / CLIP_DIR / "settings.json").read_text())


def _prepare_task_data(root: Path) -> None:
    """A COCO 2017 folder (Figs. 5, 16, 17), Objaverse renders (Fig. 7) and a VGSI folder (Fig. 8), small."""
    from m2m_pipeline.data.coco import write_coco_fixture
    from m2m_pipeline.tasks import write_objaverse_fixture, write_vgsi_fixture

    if not (root / COCO_DIR).exists():
        write_coco_fixture(root / COCO_DIR)
    if not (root / OBJAVERSE_DIR).exists():
        write_objaverse_fixture(root / OBJAVERSE_DIR)
    if not (root / VGSI_DIR).exists():
        write_vgsi_fixture(root / VGSI_DIR)


def dryrun_run_config(root: Path, device: str, threads: int = 0) -> dict[str, Any]:
    """The paper run config's resources, sized for a dry run (module docstring); no k8s execution block."""
    from m2m_pipeline.orchestration.dvc_pointers import local_pointer_config
    from m2m_pipeline.orchestration.finetune_assets import dryrun_task_ops
    from m2m_pipeline.orchestration.profiles import PROFILES

    return {"resources": {
        "settings": {"config": {
            "profile": PROFILE, "repo_dir": str(root), "caption_source": CAPTIONS, "sd_model_path": SD_DIR,
            "dino_path": DINO_DIR, "train_from_scratch": False,
            "inception_weights": f"{INCEPTION_DIR}/inception-2015-12-05.pt", **_clip_settings(root),
            "coco_dir": COCO_DIR, "objaverse_dir": OBJAVERSE_DIR, "vgsi_dir": VGSI_DIR,
            "mis": {"num_inference_steps": 1, "images_per_set": 6},
            # one epoch of a one-set subset per variant: the paper preset's derived length, at the dry run's size
            "train": {"subset_sets": {"self": 1, "dino": 1}, "epochs": 1, "steps": 0, "batch_size": 1,
                      "global_batch_size": 1},
            "eval_preset": "dryrun"}},
        "compute": {"config": {"device": device, "dtype": "float32", "workers": 0, "launcher": "inprocess",
                               "torch_threads": threads}},
        "mlflow": {"config": {"mode": "local", "repo_dir": str(root), "experiment": "m2m-paper-dryrun"}},
        # pointers mode, as configs/paper.yaml: the remote and the pointer repository are local folders here
        "dvc": {"config": local_pointer_config(root / DVC_DIR)},
    }, "ops": dryrun_task_ops(PROFILES[PROFILE])}


def run_stage(root: Path, stage: str, device: str, threads: int = 0) -> dict[str, Any]:
    """One op of the paper job, in this process (the child's side of `main`)."""
    from dagster import DagsterInstance

    from m2m_pipeline.definitions import defs
    from m2m_pipeline.orchestration.jobs import range_tags
    from m2m_pipeline.orchestration.profiles import PROFILES

    job = defs.resolve_job_def(JOB)
    (root / ".state" / "dagster").mkdir(parents=True, exist_ok=True)
    instance = DagsterInstance.local_temp(tempdir=str(root / ".state" / "dagster"))
    start = time.perf_counter()
    run_config = dryrun_run_config(root, device, threads)
    op = f"{PROFILE}__{stage}"
    run_config["ops"] = {k: v for k, v in run_config["ops"].items() if k == op}  # config only for the op that runs
    result = job.execute_in_process(run_config=run_config, instance=instance, op_selection=[op], tags=range_tags(PROFILES[PROFILE]),
                                    raise_on_error=True)
    seconds = time.perf_counter() - start
    row = {"stage": stage, "success": result.success, "seconds": round(seconds, 1),
           "peak_rss_gib": _peak_rss_gib()}
    import torch

    if torch.cuda.is_available():
        row["peak_cuda_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return row


def _peak_rss_gib() -> float:
    """This process's peak resident memory. Linux's VmHWM belongs to the process image (reset by exec), unlike
    getrusage's ru_maxrss, which a child inherits from its parent at fork."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 2**20, 2)  # kB
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)  # Linux: KiB


def format_rows(rows: list[dict[str, Any]], scale: str) -> str:
    cuda = any("peak_cuda_gib" in r for r in rows)
    head = "| stage | seconds | peak RSS GiB |" + (" peak CUDA GiB |" if cuda else "")
    lines = [f"paper-dryrun ({scale} scale, random weights in the released layouts)", head,
             "|---|---|---|" + ("---|" if cuda else "")]
    for r in rows:
        status = "" if r.get("success", False) else " (failed)"
        lines.append(f"| {r['stage']}{status} | {r.get('seconds', '-')} | {r.get('peak_rss_gib', '-')} |"
                     + (f" {r.get('peak_cuda_gib', '-')} |" if cuda else ""))
    lines.append(f"| total | {sum(r.get('seconds', 0) for r in rows):.1f} | "
                 f"{max((r.get('peak_rss_gib', 0) for r in rows), default=0)} |" + (" |" if cuda else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/paper-dryrun"), help="the dry run's repo root")
    ap.add_argument("--scale", choices=("full", "small"), default="full")
    ap.add_argument("--device", default="auto", help="compute.device of the run config (auto, cpu, cuda)")
    ap.add_argument("--threads", type=int, default=0, help="compute.torch_threads (0: torch's default)")
    ap.add_argument("--stages", nargs="*", default=None, metavar="STAGE", help="a subset of the job's ops "
                    "(default: all of them, in dependency order)")
    # the child: run one op (or write the folders) and print its row
    ap.add_argument("--stage", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    root = args.out.resolve()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.stage == PREPARE:
        start = time.perf_counter()
        prepare(root, args.scale)
        print("DRYRUN-ROW " + json.dumps({"stage": PREPARE, "success": True,
                                          "seconds": round(time.perf_counter() - start, 1),
                                          "peak_rss_gib": _peak_rss_gib()}), flush=True)
        return 0
    if args.stage:
        print("DRYRUN-ROW " + json.dumps(run_stage(root, args.stage, args.device, args.threads)), flush=True)
        return 0
    stages = job_stages()
    unknown = sorted(set(args.stages or ()) - set(stages))
    if unknown:
        ap.error(f"--stages: {unknown[0]!r} is not an op of {JOB}; its ops: {', '.join(stages)}")
    root.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for stage in (PREPARE, *[s for s in stages if args.stages is None or s in args.stages]):  # each in its own process: its peak memory is its own
        print(f"--- {stage}", flush=True)
        proc = subprocess.run([sys.executable, "-m", "m2m_pipeline.orchestration.dryrun", "--out", str(root),
                               "--scale", args.scale, "--device", args.device, "--threads", str(args.threads),
                               "--stage", stage],
                              capture_output=True, text=True)
        found = [line for line in proc.stdout.splitlines() if line.startswith("DRYRUN-ROW ")]
        if proc.returncode != 0 or not found:
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
            rows.append({"stage": stage, "success": False})
            print(format_rows(rows, args.scale))
            print(f"paper-dryrun: stage {stage} failed (exit {proc.returncode}); its log is above", file=sys.stderr)
            return 1
        rows.append(json.loads(found[-1].removeprefix("DRYRUN-ROW ")))
        print(f"    {rows[-1]['seconds']} s, peak {rows[-1]['peak_rss_gib']} GiB", flush=True)  # kept if cut off
    print(format_rows(rows, args.scale))
    return 0


if __name__ == "__main__":
    sys.exit(main())
