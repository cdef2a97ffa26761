"""Damaged shards, read by every reader of the kind: the training loader, evaluation's test-set loading and the
validator for feature shards; the feature step and the validator for MIS shards. Every fault (a one-bit flip in
each member type, tar header damage, truncation, a deleted member, an empty file, the wrong file, a deleted or
inconsistent manifest) stops the reader with an error naming the shard file; nothing is committed."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from m2m_pipeline.data import MISDataError, ShardError, get_preset, make_loader
from m2m_pipeline.data.features import build_feature_shard, load_feature_encoders
from m2m_pipeline.data.shards import manifest_path
from m2m_pipeline.data.validators import validate_feature_shard, validate_mis_shard
from m2m_pipeline.evaluation.protocol import load_test_sets

from .faults import drop_member, flip, member, members, truncate

SHARD = "mis-000000.tar"


def flip_member(suffix: str) -> Callable[[Path], None]:
    def fault(shard: Path) -> None:
        m = member(shard, suffix)
        flip(shard, m.data + m.size // 2)
    return fault


def header_byte(offset_in_header: int, sample: int = 1) -> Callable[[Path], None]:
    def fault(shard: Path) -> None:
        first = members(shard)[0] if sample == 0 else next(
            m for m in members(shard) if m.name.startswith(member(shard, "caption.txt", sample).name.split(".")[0]))
        flip(shard, first.header + offset_in_header)
    return fault


def cut_inside_member(shard: Path) -> None:
    m = member(shard, "caption.txt")
    truncate(shard, m.data + m.size // 2)


def cut_at_sample_boundary(shard: Path) -> None:
    key = member(shard, "caption.txt", 2).name.split(".")[0]
    truncate(shard, next(m.header for m in members(shard) if m.name.startswith(key)))


def delete_member(shard: Path) -> None:
    drop_member(shard, member(shard, "caption.txt").name)


def empty(shard: Path) -> None:
    shard.write_bytes(b"")


def other_shard(shard: Path) -> None:  # a well-formed shard of the same kind under this name
    shutil.copy(shard.with_name("mis-000001.tar"), shard)


def other_kind(shard: Path) -> None:   # the MIS shard in place of its feature shard and vice versa
    kind, split = shard.parent.parent.name, shard.parent.name
    shutil.copy(shard.parents[2] / ("features" if kind == "mis" else "mis") / split / shard.name, shard)


def manifest_deleted(shard: Path) -> None:
    manifest_path(shard).unlink()


def manifest_not_json(shard: Path) -> None:
    manifest_path(shard).write_bytes(b"\x80\x04not json")


def manifest_count(shard: Path) -> None:
    m = json.loads(manifest_path(shard).read_text())
    manifest_path(shard).write_text(json.dumps({**m, "num_samples": m["num_samples"] + 1}))


def manifest_keys(shard: Path) -> None:
    m = json.loads(manifest_path(shard).read_text())
    manifest_path(shard).write_text(json.dumps({**m, "keys": m["keys"][:-1] + ["0" * 16]}))


COMMON = {"header_name": header_byte(10), "header_size": header_byte(124 + 8), "first_header": header_byte(10, 0),
          "cut_inside_member": cut_inside_member, "cut_at_sample_boundary": cut_at_sample_boundary,
          "member_deleted": delete_member, "empty_file": empty, "other_shard": other_shard, "other_kind": other_kind,
          "manifest_deleted": manifest_deleted, "manifest_not_json": manifest_not_json,
          "manifest_count": manifest_count, "manifest_keys": manifest_keys}
FAULTS = {
    "features": {**{f"flip_{s}": flip_member(s) for s in ("latents.npy", "dino.npy", "caption.txt",
                                                            "attributes.json")}, **COMMON},
    "mis": {**{f"flip_{s}": flip_member(s) for s in ("07.png", "caption.txt", "gen.json", "attributes.json")},
            **COMMON},
}


@pytest.fixture(scope="module")
def encoders():
    return load_feature_encoders(get_preset("tiny"), "cpu")


def read_for_training(shard: Path, _) -> None:
    list(make_loader(shard, n_images=3, shuffle_buffer=0))


def read_for_evaluation(shard: Path, _) -> None:
    load_test_sets(shard, num_sets=1, context_images=4)  # one set asked for: the whole shard is still checked


def feature_step(shard: Path, encoders) -> None:
    out = shard.parents[2] / "new-features"
    try:
        build_feature_shard(shard, out, *encoders, get_preset("tiny"), progress=False)
    finally:
        assert not out.exists() or not any(out.iterdir()), "a feature shard was committed from a damaged MIS shard"


READERS = {"features": {"loader": read_for_training, "evaluation": read_for_evaluation,
                        "validator": validate_feature_shard},
           "mis": {"feature_step": feature_step, "validator": lambda shard: validate_mis_shard(shard, 25)}}
CASES = [(kind, fault, reader) for kind in FAULTS for fault in FAULTS[kind] for reader in READERS[kind]]


@pytest.mark.parametrize(("kind", "fault", "reader"), CASES)
def test_every_reader_stops_at_a_damaged_shard_naming_it(data, encoders, kind, fault, reader):
    shard = data / kind / "train" / SHARD
    FAULTS[kind][fault](shard)
    read = READERS[kind][reader]
    if reader == "validator":
        result = read(shard)
        assert not result.passed and any(str(shard) in e for e in result.errors), result.errors
        return
    with pytest.raises(MISDataError) as caught:  # ShardError and other bad-data errors
        read(shard, encoders)
    message = str(caught.value)
    assert str(shard) in message and "\n" not in message, message


def test_a_bit_flip_in_the_latents_stops_training_before_any_checkpoint(data):
    """`m2m train` on feature shards one of which has a flipped latent bit: exit 1, one line naming the shard,
    no checkpoint written (on main this trained with exit 0)."""
    from click.testing import CliRunner

    from m2m_pipeline.cli import main

    shard = data / "features" / "train" / SHARD
    flip_member("latents.npy")(shard)
    out = data / "run"
    result = CliRunner().invoke(main, ["train", "--preset", "tiny", "--data", str(shard.parent), "--steps", "2",
                                       "--out", str(out)])
    assert result.exit_code == 1, result.output
    assert f"Error: {shard}: sha256" in result.output and "Traceback" not in result.output
    assert not list(out.glob("checkpoint-*")) and not (out / "final").exists()


def test_a_shard_damaged_while_training_is_caught_before_the_checkpoint(data):
    """Shards larger than the shuffle buffer are still open when a checkpoint is due: the ledger hashes them first.
    Here the shard's tail goes bad after its first sample was consumed."""
    from m2m_pipeline.data.loader import ShardLedger

    shard = data / "features" / "train" / SHARD
    ledger = ShardLedger()
    stream = iter(make_loader(shard, n_images=3, batch_size=1, shuffle_buffer=0, repeat=True))
    ledger.record(next(stream))
    assert ledger.pending() == [str(shard)]
    last = members(shard)[-1]
    flip(shard, last.data + last.size // 2)  # bytes the reader has not reached yet
    with pytest.raises(ShardError, match=f"{shard}: sample .*checked before a checkpoint"):
        ledger.verify_pending()
    with pytest.raises(ShardError, match=f"{shard}: sha256 of the"):  # and the stream itself stops at its end
        for _ in range(8):
            ledger.record(next(stream))


def test_a_verified_shard_closes_its_ledger_entry(built):
    from m2m_pipeline.data.loader import ShardLedger

    shard = built / "features" / "train" / SHARD
    ledger = ShardLedger()
    for batch in make_loader(shard, n_images=3, batch_size=1, shuffle_buffer=0):
        ledger.record(batch)
    assert ledger.pending() == []


# ---- reads without a manifest (verify=False: the validators' own reads, other tools' shards)
def test_a_corrupt_attributes_json_names_shard_and_key_without_a_manifest(data):
    from m2m_pipeline.data import MISExamples

    shard = data / "features" / "train" / SHARD
    m = member(shard, "attributes.json", 0)
    data_bytes = bytearray(shard.read_bytes())
    data_bytes[m.data : m.data + 2] = b"\xff\xfe"  # not UTF-8 (was a bare UnicodeDecodeError on main)
    shard.write_bytes(bytes(data_bytes))
    manifest_path(shard).unlink()
    with pytest.raises(ShardError) as caught:
        list(MISExamples(shard, n_images=3, shuffle_buffer=0, verify=False))
    assert caught.value.shard == str(shard) and caught.value.key == m.name.split(".")[0]
    assert "'attributes.json' is not UTF-8" in str(caught.value)


@pytest.mark.parametrize("fault", ["header_name", "header_size", "cut_at_sample_boundary"])
def test_a_damaged_tar_without_a_manifest_is_an_error_not_fewer_samples(data, fault):
    from m2m_pipeline.data import read_samples

    shard = data / "features" / "train" / SHARD
    FAULTS["features"][fault](shard)
    manifest_path(shard).unlink()
    with pytest.raises(ShardError, match=f"^{shard}: sample .*(corrupt tar header|no end-of-archive marker)"):
        list(read_samples([shard], verify=False))
