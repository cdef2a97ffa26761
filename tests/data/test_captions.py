"""Caption filtering (Sec. 4): CLIP token counts, malformed-line reporting, dedup, split, formats."""

from __future__ import annotations

import bz2
import gzip
import json
import shutil

import open_clip
import pytest

from m2m_pipeline.data import (
    CaptionFileError,
    MISDataError,
    filter_captions,
    normalise_caption,
    read_caption_table,
    write_caption_tsv,
)
from m2m_pipeline.data.captions import stats_path


def open_clip_count(text: str) -> int:
    """Independent count: position of CLIP's end token (the largest id) in open_clip.tokenize, plus one."""
    tokens = open_clip.tokenize([text], context_length=1024)[0]
    return int(tokens.argmax()) + 1


def fixture_rows(path) -> dict[int, str]:
    """line number -> raw caption, for lines that parse as exactly two UTF-8 columns."""
    rows = {}
    for number, raw in enumerate(path.read_bytes().split(b"\n")[:-1], start=1):
        try:
            columns = raw.rstrip(b"\r").decode("utf-8").split("\t")
        except UnicodeDecodeError:
            continue
        if len(columns) == 2:
            rows[number] = columns[1]
    return rows


def test_token_counts_match_open_clip(tricky_tsv, tiny_cfg, tmp_path):
    stats = filter_captions(tricky_tsv, tmp_path / "c.jsonl", tiny_cfg, progress=False)
    kept = {int(r.source.rsplit(":", 1)[1]): r for r in read_caption_table(tmp_path / "c.jsonl")}
    rows = fixture_rows(tricky_tsv)
    checked = 0
    for number, raw in rows.items():
        text = normalise_caption(raw)
        if not text:
            assert number not in kept
            continue
        expected = open_clip_count(text)
        if expected <= 77:
            assert number in kept, f"line {number} ({expected} tokens) should be kept"
            assert kept[number].tokens == expected, f"line {number}"
            checked += 1
        else:
            assert number not in kept, f"line {number} ({expected} tokens) should be dropped"
    # The fixture's boundary lines really sit on the boundary.
    boundary = sorted(open_clip_count(normalise_caption(rows[n])) for n in (10, 11, 12, 13, 14, 19, 20))
    assert boundary == [76, 77, 77, 77, 78, 78, 78]
    assert checked >= 12 and stats.kept == len(kept)


def test_stats_and_malformed_lines_with_file_and_line(tricky_tsv, tiny_cfg, tmp_path):
    stats = filter_captions(tricky_tsv, tmp_path / "c.jsonl", tiny_cfg, progress=False)
    assert (stats.lines_read, stats.malformed, stats.empty, stats.too_long, stats.duplicates, stats.kept) == (
        23, 5, 1, 3, 1, 14)
    where = {s["where"]: s["reason"] for s in stats.malformed_samples}
    assert where == {
        f"{tricky_tsv}:6": "3 columns, expected 2 (url, caption)",   # a TAB inside a caption: malformed
        f"{tricky_tsv}:7": "no tab",
        f"{tricky_tsv}:8": "bad UTF-8 at byte 28",
        f"{tricky_tsv}:21": "no tab",                                   # a blank line
        f"{tricky_tsv}:23": "bad UTF-8 at byte 51",
    }
    on_disk = json.loads(stats_path(tmp_path / "c.jsonl").read_text())
    assert on_disk["malformed_samples"] == stats.malformed_samples and on_disk["kept"] == 14


def test_normalisation(tricky_tsv, tiny_cfg, tmp_path):
    filter_captions(tricky_tsv, tmp_path / "c.jsonl", tiny_cfg, progress=False)
    by_line = {int(r.source.rsplit(":", 1)[1]): r.caption for r in read_caption_table(tmp_path / "c.jsonl")}
    assert by_line[5] == "Tom & Jerry \"cartoon\" <3 'classic'"     # HTML entities unescaped
    assert by_line[16].startswith("café au lait")                   # mojibake repaired
    assert by_line[17] == "a line with windows line ending"         # CR stripped
    assert by_line[18] == "lots of odd spaces"                      # NBSP / ideographic space collapsed
    assert by_line[4].startswith("東京タワー")                         # CJK kept


def test_dedup_and_stable_ids(tricky_tsv, tiny_cfg, tmp_path):
    filter_captions(tricky_tsv, tmp_path / "all.jsonl", tiny_cfg, progress=False)
    stats = filter_captions(tricky_tsv, tmp_path / "dedup.jsonl", tiny_cfg.replace(dedup=True), progress=False)
    everything = list(read_caption_table(tmp_path / "all.jsonl"))
    deduped = list(read_caption_table(tmp_path / "dedup.jsonl"))
    assert stats.kept == 13 and stats.duplicates == 1
    ids = [r.id for r in everything]
    assert len(set(ids)) == len(ids)
    first, repeat = everything[0], next(r for r in everything if r.source.endswith(":15"))
    assert repeat.id == first.id + "_1" and repeat.split == first.split  # same caption, same split
    assert [r.id for r in deduped] == [i for i in ids if "_" not in i]


def test_split_is_deterministic_and_sized(tiny_cfg, tmp_path):
    rows = [(f"http://x/{i}", f"caption number {i} of a test") for i in range(2000)]
    write_caption_tsv(tmp_path / "many.tsv", rows)
    cfg = tiny_cfg.replace(test_fraction=0.1)
    a = filter_captions(tmp_path / "many.tsv", tmp_path / "a.jsonl", cfg, progress=False)
    filter_captions(tmp_path / "many.tsv", tmp_path / "b.jsonl", cfg, progress=False)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert 150 < a.test < 250 and 330 < a.validation < 470 and a.train + a.validation + a.test == 2000
    # the validation split comes out of train: the test split is the same with or without it
    filter_captions(tmp_path / "many.tsv", tmp_path / "c.jsonl", cfg.replace(validation_fraction=0.0), progress=False)
    split_of = lambda path: {json.loads(line)["id"]: json.loads(line)["split"] for line in path.open()}
    with_val, without = split_of(tmp_path / "a.jsonl"), split_of(tmp_path / "c.jsonl")
    assert {k for k, s in with_val.items() if s == "test"} == {k for k, s in without.items() if s == "test"}
    assert {s for k, s in without.items() if with_val[k] == "validation"} == {"train"}
    assert {r.split for r in read_caption_table(tmp_path / "a.jsonl", split="test")} == {"test"}


def test_compressed_inputs_and_globs_give_the_same_table(tricky_tsv, tiny_cfg, tmp_path):
    data = tricky_tsv.read_bytes()
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "part-0.tsv.gz").write_bytes(gzip.compress(data))
    (tmp_path / "in" / "part-1.tsv.bz2").write_bytes(bz2.compress(data))
    shutil.copy(tricky_tsv, tmp_path / "in" / "part-2.tsv")
    stats = filter_captions(str(tmp_path / "in" / "part-*"), tmp_path / "c.jsonl", tiny_cfg, progress=False)
    assert stats.lines_read == 3 * 23 and stats.malformed == 3 * 5 and stats.duplicates == 1 + 2 * 14
    sources = {r.source.rsplit(":", 1)[0] for r in read_caption_table(tmp_path / "c.jsonl")}
    assert {s.rsplit("/", 1)[1] for s in sources} == {"part-0.tsv.gz", "part-1.tsv.bz2", "part-2.tsv"}


def test_clear_errors(tiny_cfg, tmp_path):
    with pytest.raises(CaptionFileError, match="matched no files"):
        filter_captions(str(tmp_path / "nothing-*.tsv"), tmp_path / "c.jsonl", tiny_cfg, progress=False)
    with pytest.raises(CaptionFileError, match="does not exist"):
        filter_captions(tmp_path / "missing.tsv", tmp_path / "c.jsonl", tiny_cfg, progress=False)
    (tmp_path / "cut.tsv.gz").write_bytes(gzip.compress(b"http://x\ta caption\n" * 100)[:-20])
    with pytest.raises(CaptionFileError, match="cut.tsv.gz.*truncated"):
        filter_captions(tmp_path / "cut.tsv.gz", tmp_path / "c.jsonl", tiny_cfg, progress=False)
    (tmp_path / "bad.jsonl").write_text('{"id": "a"}\n')
    with pytest.raises(MISDataError, match=r"bad.jsonl:1: .*lacks field"):
        list(read_caption_table(tmp_path / "bad.jsonl"))
    with pytest.raises(ValueError, match="row 2: caption contains a tab"):
        write_caption_tsv(tmp_path / "x.tsv", [("u", "fine"), ("u", "not\tfine")])
