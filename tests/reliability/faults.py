"""Fault injection helpers: where the members of a tar shard lie, and byte-level damage."""

from __future__ import annotations

import hashlib
import io
import tarfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Member:
    name: str
    header: int   # byte offset of its 512-byte header
    data: int     # byte offset of its data
    size: int


def members(shard: Path) -> list[Member]:
    with tarfile.open(fileobj=io.BytesIO(shard.read_bytes())) as tar:
        return [Member(m.name, m.offset, m.offset_data, m.size) for m in tar.getmembers()]


def member(shard: Path, suffix: str, sample: int = 1) -> Member:
    """The member ending in `suffix` of the `sample`-th sample (0-based, in tar order)."""
    keys = list(dict.fromkeys(m.name.split(".", 1)[0] for m in members(shard)))
    name = f"{keys[sample]}.{suffix}"
    return next(m for m in members(shard) if m.name == name)


def flip(path: Path, offset: int, bits: int = 0x01) -> None:
    """Flip bits of one byte (default: the lowest, as bit rot does; text stays ASCII, arrays stay arrays)."""
    data = bytearray(path.read_bytes())
    data[offset] ^= bits
    path.write_bytes(bytes(data))


def truncate(path: Path, size: int) -> None:
    path.write_bytes(path.read_bytes()[:size])


def drop_member(shard: Path, name: str) -> None:
    """Rewrite the tar without one member (a well-formed tar that lost a file)."""
    source = tarfile.open(fileobj=io.BytesIO(shard.read_bytes()))
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for m in source.getmembers():
            if m.name != name:
                tar.addfile(m, source.extractfile(m))
    shard.write_bytes(out.getvalue())


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under `root`: equal before and after a refused operation means nothing was lost."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


class Boom:
    """An executing pickle: unpickling it calls open(marker, "w"), which creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def pickle_bytes(marker: Path) -> bytes:
    """torch.save of Boom: what torch.load(weights_only=False), as accelerate's load_state uses, would execute."""
    import torch

    buffer = io.BytesIO()
    torch.save(Boom(marker), buffer)
    return buffer.getvalue()
