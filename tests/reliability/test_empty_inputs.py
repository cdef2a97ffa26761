"""Empty and wrong inputs: a caption file with no well-formed line is an error naming it; a run that would produce
zero captions, sets or examples fails instead of writing an empty output; a good earlier output is never
replaced (its bytes are compared before and after)."""

from __future__ import annotations

import gzip
import json

import pytest

from m2m_pipeline.data import CaptionFileError, MISDataError, filter_captions, generate_mis, get_preset
from m2m_pipeline.data import make_generator
from m2m_pipeline.data.captions import stats_path
from m2m_pipeline.data.features import build_feature_shards

CFG = get_preset("tiny")

BAD_CAPTION_FILES = {
    "empty.tsv": b"",
    "binary.tsv": bytes(range(256)) * 8,                           # not UTF-8, no tabs where they belong
    "no_tabs.tsv": b"a caption without its url\nanother one\n",
    "three_columns.tsv": b"http://x\ta caption\textra\n",
    "empty.tsv.gz": gzip.compress(b"", mtime=0),
}


@pytest.fixture
def good_table(data):
    """The build's caption table and stats: what a failed run must leave exactly as it was."""
    table = data / "captions.jsonl"
    return table, table.read_bytes(), stats_path(table).read_bytes()


@pytest.mark.parametrize("name", sorted(BAD_CAPTION_FILES))
def test_a_caption_file_with_no_well_formed_line_is_an_error_naming_it(data, good_table, name):
    table, before, stats_before = good_table
    bad = data / name
    bad.write_bytes(BAD_CAPTION_FILES[name])
    with pytest.raises(CaptionFileError, match=rf"^{bad}: no well-formed `url<TAB>caption` line"):
        filter_captions(bad, table, CFG, progress=False)
    assert table.read_bytes() == before and stats_path(table).read_bytes() == stats_before


def test_one_bad_file_among_good_ones_fails_the_run(data, good_table):
    table, before, _ = good_table
    (data / "bad.tsv").write_bytes(b"\xff\xfe binary\n")
    with pytest.raises(CaptionFileError, match="bad.tsv: no well-formed"):
        filter_captions([data / "captions.tsv", data / "bad.tsv"], table, CFG, progress=False)
    assert table.read_bytes() == before


def test_zero_captions_kept_is_an_error_and_keeps_the_old_table(data, good_table):
    """Well-formed lines that all fail the filter (over 77 CLIP tokens): 0 captions is a failure, not a table."""
    table, before, stats_before = good_table
    (data / "long.tsv").write_text("".join(f"http://x/{i}\t{' '.join(['word'] * 90)} {i}\n" for i in range(3)))
    with pytest.raises(MISDataError, match=r"long.tsv: no caption kept of 3 lines \(0 malformed, 0 empty, 3 over 77"):
        filter_captions(data / "long.tsv", table, CFG, progress=False)
    assert table.read_bytes() == before and stats_path(table).read_bytes() == stats_before


def test_a_split_without_captions_generates_nothing_and_fails(data):
    table = data / "captions.jsonl"
    rows = [json.loads(line) for line in table.read_text().splitlines()]
    table.write_text("".join(json.dumps(r) + "\n" for r in rows if r["split"] == "train"))
    with pytest.raises(MISDataError, match=rf"{table}: no captions in split 'test'"):
        generate_mis(table, data / "mis2" / "test", make_generator(CFG), CFG, split="test", progress=False)
    assert not (data / "mis2").exists()


def test_an_empty_caption_table_generates_nothing_and_fails(data):
    (data / "empty.jsonl").write_bytes(b"")
    with pytest.raises(MISDataError, match="no captions in split 'train'"):
        generate_mis(data / "empty.jsonl", data / "mis2", make_generator(CFG), CFG, progress=False)


def test_features_from_no_mis_shards_fail(data):
    (data / "nothing").mkdir()
    with pytest.raises(FileNotFoundError, match="no MIS shards"):
        build_feature_shards(data / "nothing", data / "features2", CFG, device="cpu", progress=False)


def test_training_on_no_examples_fails_loudly(data):
    from click.testing import CliRunner

    from m2m_pipeline.cli import main

    (data / "nothing").mkdir()
    result = CliRunner().invoke(main, ["train", "--preset", "tiny", "--data", str(data / "nothing"), "--steps", "2",
                                       "--out", str(data / "run")])
    assert result.exit_code == 1 and "no feature shards match" in result.output, result.output
    assert not (data / "run" / "final").exists()


def test_evaluation_on_no_sets_fails_loudly(data):
    from m2m_pipeline.evaluation.protocol import load_test_sets

    with pytest.raises(FileNotFoundError, match="no feature shards match"):
        load_test_sets(data / "nothing-*.tar", num_sets=None, context_images=4)
