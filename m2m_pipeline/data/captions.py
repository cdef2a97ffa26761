"""Caption filtering (Sec. 4): CC12M-format TSV in, a filtered caption table with stable ids out.

Input lines are `url<TAB>caption` (CC12M has exactly two columns and no header). A line with no tab,
more than one tab, a NUL byte, or bytes that are not UTF-8 is *malformed*: counted, sampled with `file:line` in the
stats, and skipped. A second tab is treated as malformed rather than joined into the caption because
TSV has no escaping: the extra column may as well be a shifted record, and at 12 M captions dropping a
handful costs less than rendering 25 images of a mis-parsed caption.
"""

from __future__ import annotations

import bz2
import glob
import gzip
import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO

from tqdm.auto import tqdm

from m2m_pipeline.data.config import MISConfig
from m2m_pipeline.data.errors import CaptionFileError, MISDataError
from m2m_pipeline.io import atomic_open, atomic_write_bytes, atomic_write_text
from m2m_pipeline.data.tokens import clip_token_count, normalise_caption

MAX_SAMPLES = 20  # malformed / too-long lines quoted in the stats; the counts are exact regardless


@dataclass(frozen=True)
class Caption:
    id: str          # stable id: hash of the lowercased normalised caption (+ "_k" for the k-th repeat)
    text: str        # normalised caption, the prompt given to the generator


@dataclass(frozen=True)
class CaptionRecord:
    id: str
    caption: str
    url: str
    tokens: int      # CLIP BPE tokens incl. start/end
    split: str       # "train" | "test"
    source: str      # "file:line" of the first occurrence

    def as_caption(self) -> Caption:
        return Caption(self.id, self.caption)


@dataclass
class CaptionStats:
    lines_read: int = 0
    malformed: int = 0
    empty: int = 0
    too_long: int = 0
    duplicates: int = 0
    kept: int = 0
    train: int = 0
    validation: int = 0
    test: int = 0
    files: list[str] = field(default_factory=list)
    malformed_samples: list[dict[str, str]] = field(default_factory=list)  # {"where": "file:line", "reason": ...}
    too_long_samples: list[dict[str, object]] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def expand_caption_paths(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """One path, a glob, or a list of either; sorted so the read order (and the dedup winner) is stable."""
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    out: list[Path] = []
    for item in items:
        text = os.fspath(item)
        if glob.has_magic(text):
            matches = sorted(glob.glob(text))
            if not matches:
                raise CaptionFileError(f"caption glob {text!r} matched no files")
            out.extend(Path(m) for m in matches)
        else:
            if not Path(text).is_file():
                raise CaptionFileError(f"caption file {text!r} does not exist")
            out.append(Path(text))
    return out


def _open_binary(path: Path) -> IO[bytes]:
    if path.suffix == ".gz":
        return gzip.open(path, "rb")
    if path.suffix == ".bz2":
        return bz2.open(path, "rb")
    return open(path, "rb")


@dataclass(frozen=True)
class _Line:
    where: str
    url: str | None
    caption: str | None
    problem: str | None  # reason the line is malformed, None when it parsed


def read_tsv_lines(path: Path) -> Iterator[_Line]:
    """Parse one CC12M-format file; never raises on a bad line, only on an unreadable file."""
    try:
        handle = _open_binary(path)
    except OSError as exn:
        raise CaptionFileError(f"{path}: cannot open caption file: {exn}") from exn
    with handle:
        try:
            for number, raw in enumerate(handle, start=1):
                where = f"{path}:{number}"
                raw = raw.rstrip(b"\r\n")
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exn:
                    yield _Line(where, None, None, f"bad UTF-8 at byte {exn.start}")
                    continue
                if "\x00" in line:  # text never holds NUL; a binary file does (and may hold a tab by chance)
                    yield _Line(where, None, None, "NUL byte (binary data)")
                    continue
                columns = line.split("\t")
                if len(columns) != 2:
                    reason = "no tab" if len(columns) == 1 else f"{len(columns)} columns, expected 2 (url, caption)"
                    yield _Line(where, None, None, reason)
                    continue
                yield _Line(where, columns[0].strip(), columns[1], None)
        except (OSError, EOFError) as exn:  # truncated .gz / .bz2: keep what was read, say where it stopped
            raise CaptionFileError(f"{path}: compressed stream is corrupt or truncated: {exn}") from exn


def caption_hash(text: str) -> str:
    # Lowercased: SD's tokenizer lowercases, so "A Dog" and "a dog" are the same prompt.
    return hashlib.sha256(text.lower().encode("utf-8")).hexdigest()


SPLITS: tuple[str, ...] = ("train", "validation", "test")


def split_of(digest: str, test_fraction: float, validation_fraction: float = 0.0) -> str:
    """"test" for the first `test_fraction` of the hash range, "validation" for the next `validation_fraction`
    (hyperparameters such as guidance are chosen there, never on test), "train" for the rest.

    Uses digest bits disjoint from the id's, and the caption (not the line) is hashed, so repeated captions
    always land in the same split: no leakage through duplicates. Adding a validation split leaves the test
    split unchanged (its bucket range is the same)."""
    bucket = int(digest[16:32], 16) / float(1 << 64)
    if bucket < test_fraction:
        return "test"
    return "validation" if bucket < test_fraction + validation_fraction else "train"


def iter_filtered_captions(
    paths: str | os.PathLike | Sequence[str | os.PathLike], cfg: MISConfig, stats: CaptionStats,
    progress: bool = True,
) -> Iterator[CaptionRecord]:
    """Stream kept captions in input order, updating `stats` as lines are read."""
    files = expand_caption_paths(paths)
    stats.files = [os.fspath(f) for f in files]
    seen: dict[str, int] = {}  # id -> times seen; 12 M short strings is ~1.5 GB, acceptable for one job
    bar = tqdm(desc="filter captions", unit=" lines", disable=not progress)
    for path in files:
        well_formed, first_problem = 0, None
        for line in read_tsv_lines(path):
            stats.lines_read += 1
            bar.update(1)
            if line.problem is not None:
                stats.malformed += 1
                first_problem = first_problem or f"{line.where.rsplit(':', 1)[1]} ({line.problem})"
                if len(stats.malformed_samples) < MAX_SAMPLES:
                    stats.malformed_samples.append({"where": line.where, "reason": line.problem})
                continue
            well_formed += 1
            assert line.caption is not None and line.url is not None
            text = normalise_caption(line.caption)
            if not text:
                stats.empty += 1
                continue
            tokens = clip_token_count(text)
            if tokens > cfg.max_tokens:
                stats.too_long += 1
                if len(stats.too_long_samples) < MAX_SAMPLES:
                    stats.too_long_samples.append({"where": line.where, "tokens": tokens})
                continue
            digest = caption_hash(text)
            base = digest[:16]
            repeat = seen.get(base, 0)
            seen[base] = repeat + 1
            if repeat:
                stats.duplicates += 1
                if cfg.dedup:
                    continue
            caption_id = base if repeat == 0 else f"{base}_{repeat}"
            split = split_of(digest, cfg.test_fraction, cfg.validation_fraction)
            stats.kept += 1
            setattr(stats, split, getattr(stats, split) + 1)
            yield CaptionRecord(caption_id, text, line.url, tokens, split, line.where)
        if not well_formed:  # an empty, binary or wrong file: an error, not a source of 0 captions
            what = "the file is empty" if first_problem is None else f"first malformed line: {first_problem}"
            raise CaptionFileError(f"{path}: no well-formed `url<TAB>caption` line ({what})")
    bar.close()


def filter_captions(
    paths: str | os.PathLike | Sequence[str | os.PathLike], out: str | os.PathLike, cfg: MISConfig,
    progress: bool = True,
) -> CaptionStats:
    """Filter CC12M-format TSV into a JSON-lines caption table at `out`; stats go to `<out>.stats.json`.

    Both files are written atomically, so a crashed run leaves the previous table (or none). A caption file with
    no well-formed line, or a run that keeps no caption, raises and leaves the previous table and stats as they were.
    """
    stats = CaptionStats()
    with atomic_open(out) as handle:  # committed only if every file read and a caption survived
        for record in iter_filtered_captions(paths, cfg, stats, progress=progress):
            handle.write((json.dumps(asdict(record), ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8"))
        if stats.kept == 0:
            raise MISDataError(f"{', '.join(stats.files)}: no caption kept of {stats.lines_read} lines "
                               f"({stats.malformed} malformed, {stats.empty} empty, {stats.too_long} over "
                               f"{cfg.max_tokens} tokens, {stats.duplicates} duplicates); {out} is left as it was")
    atomic_write_text(stats_path(out), [json.dumps(stats.to_dict(), indent=1, ensure_ascii=False) + "\n"])
    return stats


def stats_path(table: str | os.PathLike) -> Path:
    return Path(os.fspath(table) + ".stats.json")


_FIELDS = ("id", "caption", "url", "tokens", "split", "source")


def read_caption_table(path: str | os.PathLike, split: str | None = None) -> Iterator[CaptionRecord]:
    """Stream a caption table; a bad row raises naming `file:line` and the field."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                row = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exn:
                raise MISDataError(f"{path}:{number}: caption table row is not JSON: {exn}") from None
            if not isinstance(row, dict):
                raise MISDataError(f"{path}:{number}: caption table row is a {type(row).__name__}, not an object")
            missing = [f for f in _FIELDS if f not in row]
            if missing:
                raise MISDataError(f"{path}:{number}: caption table row lacks field(s) {missing}")
            if not isinstance(row["tokens"], int):
                raise MISDataError(f"{path}:{number}: field 'tokens' must be an int, got {row['tokens']!r}")
            record = CaptionRecord(**{f: row[f] for f in _FIELDS})
            if split is None or record.split == split:
                yield record


def batched_captions(records: Iterable[CaptionRecord], size: int) -> Iterator[list[Caption]]:
    """Group captions into shard-sized lists in table order; shard i always gets the same captions."""
    chunk: list[Caption] = []
    for record in records:
        chunk.append(record.as_caption())
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def write_caption_tsv(path: str | os.PathLike, rows: Iterable[tuple[str, str]]) -> Path:
    """Write (url, caption) rows as CC12M-format TSV (plain, or .gz by suffix); tabs/newlines are refused."""
    path = Path(path)
    lines = []
    for number, (url, caption) in enumerate(rows, start=1):
        for name, value in (("url", url), ("caption", caption)):
            if any(c in value for c in "\t\r\n"):
                raise ValueError(f"row {number}: {name} contains a tab or newline, which TSV cannot hold: {value!r}")
        lines.append(f"{url}\t{caption}\n")
    data = "".join(lines).encode("utf-8")
    if path.suffix == ".gz":
        data = gzip.compress(data, mtime=0)  # mtime=0: identical rows give identical bytes
    atomic_write_bytes(path, data)
    return path
