"""Where a sample's bytes are, and reading them: a video file, or a member of a tar shard.

Every layer above reads a sample through this module: the index probes it, both decoders
decode it, the packing tool verifies it. A list path ``<tar file>#<member name>`` (split at
the last ``.tar#``) names a member of an uncompressed tar; with the member's byte range (the
list's ``offset``/``size`` columns, see ``ivfast.data.shards`` for the layout) it is a
:class:`Member`, read in place without scanning the tar; without them the tar's headers are
read once (:func:`lookup_member`).

:func:`open_video` opens a path or a :class:`Member` with PyAV; a member through
:class:`MemberFile`, a read-only view of the tar that never reads outside the member. DALI gets
the member's bytes (:func:`read_array`), as it gets a file's bytes. :func:`iter_frames` reads a
stream's frames, ending cleanly at a cut tail.
"""
from __future__ import annotations

import io
import os
import tarfile

import numpy as np

VIDEO_EXTS = {".mp4", ".webm", ".avi", ".mkv", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".ogv",
              ".wmv", ".3gp", ".ts"}

SEP = ".tar#"


class Member(str):
    """A path string ``<tar>#<name>`` that also knows where the member's data lies in the tar.

    A ``str`` so that everything that logs, counts or compares paths (bad-file accounting,
    ``BadSample.path``, the index cache) works unchanged; :func:`open_video` reads the range."""

    tar: str
    name: str
    offset: int
    size: int

    def __new__(cls, tar: str, name: str, offset: int, size: int):
        self = super().__new__(cls, f"{tar}#{name}")
        self.tar, self.name, self.offset, self.size = tar, name, int(offset), int(size)
        return self

    def __reduce__(self):       # pickling (spawned DataLoader workers) keeps the byte range
        return (Member, (self.tar, self.name, self.offset, self.size))


def is_member_path(path: str) -> bool:
    return SEP in str(path)


def split_member_path(path: str) -> tuple[str, str]:
    """``'/d/shard-000001.tar#key.mp4'`` -> ``('/d/shard-000001.tar', 'key.mp4')``."""
    i = str(path).rfind(SEP)
    if i < 0:
        raise ValueError(f"{path!r} is not a shard member path (<file>.tar#<member>)")
    return str(path)[:i + len(SEP) - 1], str(path)[i + len(SEP):]


def source_of(path: str, offset: int = -1, size: int = -1, lookup: bool = True) -> str:
    """What to open for a list entry / index record: a :class:`Member` when it names a tar
    member, else the path. Without offset/size, the member is looked up in the tar's headers
    (``lookup``; else the path comes back as it is, for :func:`open_video` to look up)."""
    if isinstance(path, Member) or not is_member_path(path):
        return path
    tar, name = split_member_path(path)
    if offset < 0 or size < 0:
        if not lookup:
            return path
        offset, size = lookup_member(tar, name)
    return Member(tar, name, offset, size)


def absolute(source: str) -> str:
    """``os.path.abspath`` that keeps a :class:`Member` a member."""
    if isinstance(source, Member):
        return Member(os.path.abspath(source.tar), source.name, source.offset, source.size)
    return os.path.abspath(source)


_LOOKUPS: dict[tuple, dict[str, tuple[int, int]]] = {}


def lookup_member(tar: str, name: str) -> tuple[int, int]:
    """(offset, size) of ``name``'s data in ``tar`` by reading the tar's headers (cached per tar
    version: path, size, mtime)."""
    st = os.stat(tar)
    key = (tar, st.st_size, st.st_mtime_ns)
    table = _LOOKUPS.get(key)
    if table is None:
        with tarfile.open(tar, "r:") as t:      # "r:": uncompressed only (offsets must be file offsets)
            table = {m.name: (m.offset_data, m.size) for m in t.getmembers() if m.isfile()}
        _LOOKUPS[key] = table
    if name not in table:
        raise FileNotFoundError(f"{tar} has no member {name!r}")
    return table[name]


def tar_videos(tar: str) -> list[Member]:
    """The video members of a tar (by extension), in tar order."""
    with tarfile.open(tar, "r:") as t:
        return [Member(os.path.abspath(tar), m.name, m.offset_data, m.size) for m in t.getmembers()
                if m.isfile() and os.path.splitext(m.name)[1].lower() in VIDEO_EXTS]


class MemberFile(io.RawIOBase):
    """Read-only file view of bytes [offset, offset + size) of a file: what PyAV reads a tar
    member through. Positions are relative to the member; reads stop at its end (or at the end
    of the file, for a tar cut short), never past it."""

    def __init__(self, path: str, offset: int, size: int):
        super().__init__()
        self._f = open(path, "rb", buffering=0)
        self.offset, self.size, self.pos = int(offset), int(size), 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = max(0, min(len(b), self.size - self.pos))
        if n == 0:
            return 0
        self._f.seek(self.offset + self.pos)
        got = self._f.readinto(memoryview(b)[:n])
        self.pos += got or 0
        return got or 0

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        if base + pos < 0:
            raise OSError(f"seek to {base + pos} before the member's start")
        self.pos = base + pos
        return self.pos

    def tell(self) -> int:
        return self.pos

    def close(self) -> None:
        if not self.closed:
            self._f.close()
        super().close()


def open_video(source, **kwargs):
    """``av.open`` for a path or a shard member (a :class:`Member`, or a ``tar#member`` path)."""
    import av   # PyAV is optional: ivfast.data imports without it (the DALI-only GPU machine)

    source = source_of(source)
    if isinstance(source, Member):
        # PyAV keeps a reference to the file object and does not close it: closed when the
        # container is freed (CPython frees it as soon as the caller's `with` block ends).
        return av.open(MemberFile(source.tar, source.offset, source.size), "r", **kwargs)
    return av.open(source, **kwargs)


def read_bytes(source) -> bytes:
    """The whole file or member (for DALI, which decodes bytes handed to it)."""
    source = source_of(source)
    if isinstance(source, Member):
        with MemberFile(source.tar, source.offset, source.size) as f:
            data = f.read()
        if len(data) != source.size:
            raise OSError(f"{source}: the shard ends inside this member ({len(data)} of {source.size} bytes)")
        return data
    with open(source, "rb") as f:
        return f.read()


def read_array(source):
    """The whole file or member as a writable uint8 numpy array (what the DALI decoder is fed)."""
    source = source_of(source)
    if not isinstance(source, Member):
        return np.fromfile(source, dtype=np.uint8)
    out = np.empty(source.size, np.uint8)
    got = 0
    with MemberFile(source.tar, source.offset, source.size) as f:
        while got < source.size:
            n = f.readinto(memoryview(out)[got:])
            if not n:
                break
            got += n
    if got != source.size:
        raise OSError(f"{source}: the shard ends inside this member ({got} of {source.size} bytes)")
    return out


class CorruptStream(Exception):
    """Frames decode again after a packet failed: a corrupt payload inside the stream, which
    would shift every later frame number (a failure only at the end is a cut, not this)."""


def iter_frames(container, stream, skip_nonref=None):
    """The stream's frames in output order; a stream whose last packets fail ends there.

    Real files often end with packets that do not decode (a download cut mid-GOP, a partial
    last sample): the frames before that are the video, and its length is their number. A
    failure followed by more decodable packets raises :class:`CorruptStream`. ``skip_nonref``
    (callable -> bool, asked before each packet): when it returns True the decoder skips
    non-reference frames (they are not output, so the caller must not count on them).
    """
    ctx = stream.codec_context
    # Packets that may still yield frames after a failed one without it meaning a corrupt
    # middle: the decoder's reorder delay (B-frames) releases frames decoded before the failure.
    slack = max(0, int(getattr(ctx, "has_b_frames", 0) or 0))
    err: Exception | None = None
    after_err = 0
    packets = container.demux(stream)
    # the codec context outlives an abandoned iterator (a seek starts a new one while the old
    # one had switched skipping on): start from the decoder's real state, not from a guess
    skipping = False
    if skip_nonref is not None:
        ctx.skip_frame = "DEFAULT"
    while True:
        try:
            packet = next(packets)
        except StopIteration:
            break
        except Exception as e:          # the demuxer itself fails: the container is cut here
            err = err or e
            break
        if skip_nonref is not None:
            want = bool(skip_nonref())
            if want != skipping:
                ctx.skip_frame = "NONREF" if want else "DEFAULT"
                skipping = want
        try:
            frames = packet.decode()    # an empty packet (the last one) flushes the decoder
        except Exception as e:
            err = err or e
            continue
        if frames and err is not None and packet.size:
            after_err += 1
            if after_err > slack:
                raise CorruptStream(f"frames decode again after a failed packet ({type(err).__name__}: {err})")
        yield from frames
    if skipping:
        ctx.skip_frame = "DEFAULT"
