"""Streaming archives: round trips, hashing, hostile archives, memory, manifests."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import stat
import subprocess
import tarfile
import tempfile
import tracemalloc
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from cr_queue.tomodir import archive
from cr_queue.tomodir.archive import extracting
from cr_queue.tomodir.archive import (
    ArchiveError,
    ChecksumMismatch,
    HashingReader,
    Limits,
    UnsafeArchive,
    changed_since,
    copy_verified,
    pack,
    sha256_file,
    snapshot,
    unpack,
)

MTIME_NS = 1_600_000_000_123_456_789
# The built-in caps; the tests of the caps themselves give their own.
LIMITS = Limits()


def write(path: Path, data: bytes | str, mtime_ns: int | None = MTIME_NS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))
    return path


def make_tomodir(root: Path) -> Path:
    """A tomodir as crh_add sees it: inputs, an empty inv/ and odd names."""
    numbers = "".join(f"{i} {i * 0.5:.6e}\n" for i in range(5000))
    write(root / "grid" / "elem.dat", numbers, MTIME_NS)
    write(root / "grid" / "elec.dat", "4\n1\n2\n3\n4\n", MTIME_NS + 1)
    write(root / "mod" / "volt.dat", numbers[::-1], MTIME_NS + 2)
    write(root / "exe" / "crtomo.cfg", "***FILES***\n", MTIME_NS + 3)
    write(root / "exe" / "empty.txt", b"", MTIME_NS + 4)
    write(root / "config" / "spaced name ä.dat", "x" * 700, MTIME_NS + 5)
    write(root / "a" / "b" / "c" / "deep.dat", os.urandom(3000), MTIME_NS + 6)
    (root / "inv").mkdir()
    (root / "rho").mkdir()
    os.chmod(root / "exe" / "crtomo.cfg", 0o750)
    return root


def tree_state(root: Path) -> dict[str, tuple]:
    """Everything a user could observe about a tree, symlinks not followed."""
    state: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            rel = path.relative_to(root).as_posix()
            st_ = path.lstat()
            if stat.S_ISLNK(st_.st_mode):
                state[rel] = ("link", os.readlink(path))
            elif stat.S_ISDIR(st_.st_mode):
                state[rel] = ("dir", stat.S_IMODE(st_.st_mode))
            else:
                state[rel] = ("file", path.read_bytes(), stat.S_IMODE(st_.st_mode), st_.st_mtime_ns)
    return state


def pack_bytes(root: Path, **kwargs) -> tuple[bytes, archive.PackResult]:
    out = io.BytesIO()
    result = pack(root, out, **kwargs)
    return out.getvalue(), result


def tar_members(blob: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(zstandard.ZstdDecompressor().decompressobj().decompress(blob))) as tar:
        return tar.getmembers()


# --------------------------------------------------------------------------
# pack / unpack round trip


def test_round_trip_keeps_content_empty_dirs_modes_and_mtimes(tmp_path: Path) -> None:
    src = make_tomodir(tmp_path / "src")
    blob, result = pack_bytes(src)
    names = unpack(io.BytesIO(blob), tmp_path / "dst", limits=LIMITS)
    assert tree_state(tmp_path / "dst") == tree_state(src)
    assert snapshot(tmp_path / "dst") == snapshot(src)
    assert (tmp_path / "dst" / "inv").is_dir()
    assert "inv" in names and "grid/elem.dat" in names
    assert result.members == len(names) == len(tree_state(src))


@pytest.mark.parametrize("how", ["memory", "file, decompressed in a thread", "file, decompressed in line"])
def test_headers_and_files_across_decompressed_blocks(tmp_path: Path, how: str, monkeypatch) -> None:
    """Decompressed blocks are buffers used again: a header split between two
    of them, or a file spanning several, must come out whole."""
    long_name = "/".join(["d" * 200] * 4) + "/long.dat"  # a pax header of three blocks
    first = os.urandom(archive.CHUNK - 3 * 512)  # its header and data end a block before the first edge
    entries = [
        (info("first.dat"), first),
        (info(long_name), os.urandom(2 * archive.CHUNK + 99)),  # pax header data across the edge
        (info("after.dat"), b"tail"),
    ]
    blob = hostile(*entries)
    dest = tmp_path / "dest"
    if how == "memory":
        unpack(memoryview(blob), dest, limits=LIMITS)
    else:
        if how.endswith("in line"):
            monkeypatch.setattr(extracting, "_THREAD_ABOVE", 1 << 62)
        unpack(io.BytesIO(blob), dest, size=len(blob), limits=LIMITS)
    for ti, data in entries:
        assert (dest / ti.name).read_bytes() == data


def test_pack_reports_sizes_and_hash_of_bytes_written(tmp_path: Path) -> None:
    src = make_tomodir(tmp_path / "src")
    blob, result = pack_bytes(src)
    assert result.sha256 == hashlib.sha256(blob).hexdigest()
    assert result.size == len(blob)
    assert result.raw_size == sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
    assert result.skipped == []


def test_pack_is_deterministic(tmp_path: Path) -> None:
    src = make_tomodir(tmp_path / "src")
    assert pack_bytes(src)[0] == pack_bytes(src)[0]
    assert pack_bytes(src, threads=2)[1].sha256 == pack_bytes(src, threads=2)[1].sha256


def test_member_names_are_relative_sorted_and_owner_neutral(tmp_path: Path) -> None:
    src = make_tomodir(tmp_path / "src")
    os.chmod(src / "grid" / "elem.dat", 0o6755)
    members = tar_members(pack_bytes(src)[0])
    names = [m.name for m in members]
    assert names == sorted(names, key=lambda n: n.split("/"))
    assert all(not n.startswith(("/", "./")) for n in names)
    assert {"inv", "rho", "a", "a/b", "a/b/c"} <= set(names)
    assert all((m.uid, m.gid, m.uname, m.gname) == (0, 0, "", "") for m in members)
    elem = next(m for m in members if m.name == "grid/elem.dat")
    assert elem.mode == 0o755


def test_members_subset_includes_parents_and_dir_subtrees(tmp_path: Path) -> None:
    src = make_tomodir(tmp_path / "src")
    write(src / "inv" / "rho01.mag", "1 2\n")
    blob, result = pack_bytes(src, members=["mod/volt.dat", "inv", "./a/b/"])
    names = [m.name for m in tar_members(blob)]
    assert names == ["a", "a/b", "a/b/c", "a/b/c/deep.dat", "inv", "inv/rho01.mag", "mod", "mod/volt.dat"]
    assert result.members == len(names)
    unpack(io.BytesIO(blob), tmp_path / "dst", limits=LIMITS)
    assert (tmp_path / "dst" / "mod" / "volt.dat").read_bytes() == (src / "mod" / "volt.dat").read_bytes()


@pytest.mark.parametrize("member", ["../outside", "/etc/passwd", "grid/../../x", ""])
def test_members_must_stay_below_root(tmp_path: Path, member: str) -> None:
    src = make_tomodir(tmp_path / "src")
    with pytest.raises(ValueError, match="relative path"):
        pack(src, io.BytesIO(), members=[member])


def test_members_that_do_not_exist_are_named(tmp_path: Path) -> None:
    src = make_tomodir(tmp_path / "src")
    with pytest.raises(FileNotFoundError, match="inv/missing.dat"):
        pack(src, io.BytesIO(), members=["inv/missing.dat"])


def test_symlinks_inside_are_kept_outside_are_skipped(tmp_path: Path) -> None:
    src = make_tomodir(tmp_path / "src")
    write(tmp_path / "shared" / "grid.dat", "shared")
    os.symlink("grid/elem.dat", src / "rel_inside")
    os.symlink(src / "mod" / "volt.dat", src / "exe" / "abs_inside")
    os.symlink("grid", src / "dir_link")
    os.symlink("../shared/grid.dat", src / "rel_outside")
    os.symlink(tmp_path / "shared", src / "abs_outside")
    os.mkfifo(src / "fifo")
    blob, result = pack_bytes(src)
    assert result.skipped == ["abs_outside", "fifo", "rel_outside"]
    links = {m.name: m.linkname for m in tar_members(blob) if m.issym()}
    assert links == {"rel_inside": "grid/elem.dat", "exe/abs_inside": "../mod/volt.dat", "dir_link": "grid"}
    unpack(io.BytesIO(blob), tmp_path / "dst", limits=LIMITS)
    assert (tmp_path / "dst" / "exe" / "abs_inside").read_bytes() == (src / "mod" / "volt.dat").read_bytes()
    assert (tmp_path / "dst" / "dir_link").is_symlink()


def test_archive_is_readable_by_gnu_tar_and_zstd(tmp_path: Path) -> None:
    if not (shutil.which("zstd") and shutil.which("tar")):
        pytest.skip("zstd or tar not installed")
    src = make_tomodir(tmp_path / "src")
    (tmp_path / "a.tar.zst").write_bytes(pack_bytes(src)[0])
    (tmp_path / "gnu").mkdir()
    subprocess.run("zstd -dqc a.tar.zst | tar -x -C gnu", shell=True, check=True, cwd=tmp_path)
    assert tree_state(tmp_path / "gnu") == tree_state(src)


def test_unpacks_archives_made_by_gnu_tar(tmp_path: Path) -> None:
    if not (shutil.which("zstd") and shutil.which("tar")):
        pytest.skip("zstd or tar not installed")
    src = make_tomodir(tmp_path / "src")
    subprocess.run(f"tar -c -C {src} . | zstd -q -1 > a.tar.zst", shell=True, check=True, cwd=tmp_path)
    with open(tmp_path / "a.tar.zst", "rb") as f:
        names = unpack(f, tmp_path / "dst", limits=LIMITS)
    assert "grid/elem.dat" in names
    assert {k: v[:2] for k, v in tree_state(tmp_path / "dst").items()} == {
        k: v[:2] for k, v in tree_state(src).items()
    }


@pytest.mark.parametrize("fmt", ["gnu", "pax"])
def test_unpacks_sparse_files_made_by_gnu_tar(tmp_path: Path, fmt: str) -> None:
    if not (shutil.which("zstd") and shutil.which("tar")):
        pytest.skip("zstd or tar not installed")
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "sparse.dat", "wb") as f:
        f.write(b"head")
        f.seek(3 * archive.CHUNK)
        f.write(b"middle")
        f.truncate(5 * archive.CHUNK)
    cmd = f"tar -S --format={fmt} -c -C {src} sparse.dat | zstd -q > a.tar.zst"
    subprocess.run(cmd, shell=True, check=True, cwd=tmp_path)
    with open(tmp_path / "a.tar.zst", "rb") as f:
        unpack(f, tmp_path / "dst", limits=LIMITS)
    assert (tmp_path / "dst" / "sparse.dat").read_bytes() == (src / "sparse.dat").read_bytes()


def test_unpack_replaces_existing_files_without_following_them(tmp_path: Path) -> None:
    """Retrieval unpacks into the user's tree: existing links are replaced, never written through."""
    src = tmp_path / "src"
    write(src / "inv" / "rho01.mag", "new result")
    write(src / "inv" / "coverage.mag", "coverage")
    write(src / "inv" / "readonly.mag", "fresh")
    blob, _ = pack_bytes(src)
    dst = tmp_path / "dst"
    victim = write(tmp_path / "victim.txt", "precious")
    hard = write(tmp_path / "hard.txt", "also precious")
    (dst / "inv").mkdir(parents=True)
    os.link(hard, dst / "inv" / "rho01.mag")
    os.symlink(victim, dst / "inv" / "coverage.mag")
    write(dst / "inv" / "readonly.mag", "stale")
    os.chmod(dst / "inv" / "readonly.mag", 0o444)
    unpack(io.BytesIO(blob), dst, limits=LIMITS)
    assert tree_state(dst) == tree_state(src)
    assert victim.read_text() == "precious"
    assert hard.read_text() == "also precious"


def test_corrupt_stream_is_an_archive_error(tmp_path: Path) -> None:
    with pytest.raises(ArchiveError, match="corrupt"):
        unpack(io.BytesIO(b"not zstd at all" * 100), tmp_path / "dst", limits=LIMITS)
    blob = pack_bytes(make_tomodir(tmp_path / "src"))[0]
    for cut in (30, 200, len(blob) // 2):
        with pytest.raises(ArchiveError):
            unpack(io.BytesIO(blob[:-cut]), tmp_path / f"dst{cut}", limits=LIMITS)


# --------------------------------------------------------------------------
# hashing


def test_copy_verified_writes_and_counts(tmp_path: Path) -> None:
    chunks = [os.urandom(1000) for _ in range(5)]
    data = b"".join(chunks)
    out = io.BytesIO()
    assert copy_verified(iter(chunks), out, hashlib.sha256(data).hexdigest().upper()) == len(data)
    assert out.getvalue() == data


def test_copy_verified_detects_mismatch() -> None:
    expected = hashlib.sha256(b"what was stored").hexdigest()
    actual = hashlib.sha256(b"what arrived").hexdigest()
    with pytest.raises(ChecksumMismatch) as info:
        copy_verified([b"what ", b"arrived"], io.BytesIO(), expected)
    assert (info.value.expected, info.value.actual) == (expected, actual)
    assert expected in str(info.value) and actual in str(info.value)


def test_hashing_reader_and_sha256_file(tmp_path: Path) -> None:
    data = os.urandom(3 * archive.CHUNK + 17)
    path = write(tmp_path / "blob", data)
    expected = hashlib.sha256(data).hexdigest()
    assert sha256_file(path) == expected
    with open(path, "rb") as f:
        reader = HashingReader(f)
        assert b"".join(iter(lambda: reader.read(65536), b"")) == data
    assert reader.hexdigest() == expected and reader.size == len(data)
    reader.verify(expected)
    with pytest.raises(ChecksumMismatch):
        reader.verify("0" * 64)


# --------------------------------------------------------------------------
# hostile archives


def info(
    name: str, kind: bytes = tarfile.REGTYPE, *, size: int = 0, link: str = "", mode: int = 0o644
) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.size, ti.linkname, ti.mode = kind, size, link, mode
    return ti


def hostile(*entries: tarfile.TarInfo | tuple[tarfile.TarInfo, bytes]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in entries:
            ti, data = entry if isinstance(entry, tuple) else (entry, b"")
            ti.size = len(data) if ti.isreg() else ti.size
            tar.addfile(ti, io.BytesIO(data) if ti.isreg() else None)
    return zstandard.ZstdCompressor().compress(raw.getvalue())


def file_entry(name: str, data: bytes = b"evil", mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes]:
    return info(name, mode=mode), data


@pytest.fixture
def sandbox(tmp_path: Path) -> dict[str, Path]:
    """dest plus an outside directory that must never change."""
    outside = tmp_path / "outside"
    write(outside / "secret", "secret")
    dest = tmp_path / "sandbox" / "dest"
    dest.mkdir(parents=True)
    return {"root": tmp_path, "dest": dest, "outside": outside}


def outside_state(root: Path, dest: Path) -> dict[str, tuple]:
    return {k: v for k, v in tree_state(root).items() if not (root / k).is_relative_to(dest)}


def rejects(
    sandbox: dict[str, Path], blob: bytes, member: str, reason: str, limits: Limits = Limits()
) -> UnsafeArchive:
    before = outside_state(sandbox["root"], sandbox["dest"])
    with pytest.raises(UnsafeArchive) as caught:
        unpack(io.BytesIO(blob), sandbox["dest"], limits=limits)
    assert caught.value.member == member
    assert repr(member) in str(caught.value) and reason in str(caught.value)
    assert outside_state(sandbox["root"], sandbox["dest"]) == before
    assert not list(sandbox["dest"].rglob(".crq-*"))
    return caught.value


def test_rejects_absolute_name(sandbox: dict[str, Path]) -> None:
    name = str(sandbox["outside"] / "absolute")
    rejects(sandbox, hostile(file_entry(name)), name, "absolute")


@pytest.mark.parametrize("name", ["../evil", "a/../../evil", "a/b/../../../../evil"])
def test_rejects_dotdot(sandbox: dict[str, Path], name: str) -> None:
    rejects(sandbox, hostile(file_entry(name)), name, "'..'")


@pytest.mark.parametrize("target", ["../../outside", "../../outside/secret", "/etc", "sub/../../../outside"])
def test_rejects_symlink_outside(sandbox: dict[str, Path], target: str) -> None:
    blob = hostile(info("sub", tarfile.DIRTYPE), info("link", tarfile.SYMTYPE, link=target))
    rejects(sandbox, blob, "link", "symlink target")


@pytest.mark.parametrize("target", ["../../outside/secret", "/etc/passwd"])
def test_rejects_hardlink_outside(sandbox: dict[str, Path], target: str) -> None:
    rejects(sandbox, hostile(info("hard", tarfile.LNKTYPE, link=target)), "hard", "hard link target")


def test_rejects_hardlink_to_directory_or_symlink(sandbox: dict[str, Path]) -> None:
    blob = hostile(info("d", tarfile.DIRTYPE), info("hard", tarfile.LNKTYPE, link="d"))
    rejects(sandbox, blob, "hard", "not a regular file")


def test_hardlink_inside_works(sandbox: dict[str, Path]) -> None:
    unpack(io.BytesIO(hostile(file_entry("f", b"data"), info("g", tarfile.LNKTYPE, link="f"))), sandbox["dest"], limits=LIMITS)
    assert os.path.samefile(sandbox["dest"] / "f", sandbox["dest"] / "g")


def test_rejects_file_through_symlink_from_archive(sandbox: dict[str, Path]) -> None:
    blob = hostile(info("sub", tarfile.DIRTYPE), info("link", tarfile.SYMTYPE, link="sub"), file_entry("link/evil"))
    rejects(sandbox, blob, "link/evil", "is a symlink")


def test_rejects_file_through_symlink_already_in_dest(sandbox: dict[str, Path]) -> None:
    os.symlink(sandbox["outside"], sandbox["dest"] / "inv")
    rejects(sandbox, hostile(file_entry("inv/secret", b"overwritten")), "inv/secret", "is a symlink")
    rejects(sandbox, hostile(info("inv", tarfile.DIRTYPE)), "inv", "is a symlink")


@pytest.mark.parametrize("reverse", [False, True])
def test_rejects_symlink_chains_that_escape(sandbox: dict[str, Path], reverse: bool) -> None:
    """Each link is lexically inside; together they reach outside."""
    up = info("sub/d", tarfile.SYMTYPE, link="..")
    escape = info("sub/e", tarfile.SYMTYPE, link="d/../outside")
    blob = hostile(info("sub", tarfile.DIRTYPE), *([escape, up] if reverse else [up, escape]))
    rejects(sandbox, blob, "sub/e", "resolves outside")
    assert not os.path.lexists(sandbox["dest"] / "sub" / "e")


@pytest.mark.parametrize(
    ("kind", "reason"),
    [(tarfile.CHRTYPE, "character device"), (tarfile.BLKTYPE, "block device"), (tarfile.FIFOTYPE, "FIFO")],
)
def test_rejects_special_files(sandbox: dict[str, Path], kind: bytes, reason: str) -> None:
    rejects(sandbox, hostile(file_entry("ok"), info("dev/null", kind)), "dev/null", reason)
    assert not os.path.lexists(sandbox["dest"] / "dev" / "null")


def test_strips_setuid_setgid_and_sticky(sandbox: dict[str, Path]) -> None:
    blob = hostile(info("d", tarfile.DIRTYPE, mode=0o3777), file_entry("d/run", mode=0o6755))
    unpack(io.BytesIO(blob), sandbox["dest"], limits=LIMITS)
    assert stat.S_IMODE((sandbox["dest"] / "d" / "run").stat().st_mode) == 0o755
    assert stat.S_IMODE((sandbox["dest"] / "d").stat().st_mode) == 0o777


def test_rejects_too_many_members(sandbox: dict[str, Path]) -> None:
    blob = hostile(*(file_entry(f"f{i}") for i in range(5)))
    rejects(sandbox, blob, "f3", "more than 3 members", Limits(max_members=3))
    assert sorted(p.name for p in sandbox["dest"].iterdir()) == ["f0", "f1", "f2"]


def test_rejects_too_many_bytes_before_writing(sandbox: dict[str, Path]) -> None:
    blob = hostile(file_entry("a", b"x" * 600), file_entry("b", b"x" * 600))
    rejects(sandbox, blob, "b", "exceed the limit of 1000 bytes", Limits(max_bytes=1000))
    assert not (sandbox["dest"] / "b").exists()


def test_rejects_bomb_by_its_header(sandbox: dict[str, Path]) -> None:
    """A member claiming 21 GiB is refused before a byte is decompressed."""
    header = info("bomb", size=21 * 2**30).tobuf(tarfile.PAX_FORMAT)
    blob = zstandard.ZstdCompressor().compress(header + bytes(4096))
    rejects(sandbox, blob, "bomb", "exceed the limit")


def test_rejects_oversized_metadata(sandbox: dict[str, Path]) -> None:
    ti = info("first")
    big = info("second")
    big.pax_headers = {"comment": "x" * (2 * archive.CHUNK)}
    rejects(sandbox, hostile((ti, b"1"), (big, b"2")), "(header after 'first')", "metadata larger")


def test_rejects_file_over_directory(sandbox: dict[str, Path]) -> None:
    blob = hostile(info("d", tarfile.DIRTYPE), file_entry("d"))
    rejects(sandbox, blob, "d", "directory of that name")


BENIGN = ["a", "b", "c", "sub", "x y", "d"]
NAME_PARTS = st.sampled_from(BENIGN * 4 + ["..", ".", "", "<OUT>", "../outside"])
TARGET_PARTS = st.sampled_from(BENIGN * 2 + ["..", ".", "../..", "<OUT>", "<OUT>/secret", "../outside/secret"])
KINDS = st.sampled_from(["file", "file", "dir", "dir", "symlink", "symlink", "hardlink", "hardlink", "fifo", "chr"])


@st.composite
def archives(draw: st.DrawFn) -> list[tuple[str, str, str]]:
    """Mostly plausible members with hostile parts mixed in, so that both
    extraction and every rejection are exercised."""
    name = st.lists(NAME_PARTS, min_size=1, max_size=4).map("/".join)
    target = st.lists(TARGET_PARTS, min_size=1, max_size=3).map("/".join)
    return draw(st.lists(st.tuples(KINDS, name, target), max_size=12))


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(archives())
def test_property_nothing_is_written_outside_dest(entries: list[tuple[str, str, str]]) -> None:
    kinds = {
        "file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
        "hardlink": tarfile.LNKTYPE, "fifo": tarfile.FIFOTYPE, "chr": tarfile.CHRTYPE,
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        outside = root / "outside"
        write(outside / "secret", "secret")
        dest = root / "dest"
        dest.mkdir()
        os.symlink(outside, dest / "sub")  # a user's symlink leading out

        def real(text: str) -> str:
            return text.replace("<OUT>", str(outside))

        members = [
            (info(real(name), kinds[kind], link=real(target)), b"payload") if kind == "file"
            else info(real(name), kinds[kind], link=real(target))
            for kind, name, target in entries
        ]  # fmt: skip
        blob = hostile(*members)
        before = outside_state(root, dest)
        try:
            unpack(io.BytesIO(blob), dest, limits=LIMITS)
            event("unpacked")
        except UnsafeArchive as e:
            event(f"rejected: {e.reason.split(' ')[0]}")
        assert outside_state(root, dest) == before
        assert (outside / "secret").read_text() == "secret"
        for path in dest.rglob("*"):
            assert not path.name.startswith(".crq-")
            if path.is_symlink() and os.readlink(path) != str(outside):
                assert Path(os.path.realpath(path)).is_relative_to(dest.resolve())


# --------------------------------------------------------------------------
# bounded memory


def test_pack_and_unpack_large_file_in_bounded_memory(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    size = 50 * 2**20
    with open(src / "big.dat", "wb") as f:
        for _ in range(size // archive.CHUNK):
            f.write(os.urandom(archive.CHUNK))
    tracemalloc.start()
    try:
        with open(tmp_path / "big.tar.zst", "wb") as out:
            result = pack(src, out)
        _, pack_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        with open(tmp_path / "big.tar.zst", "rb") as f:
            unpack(f, tmp_path / "dst", limits=LIMITS)
        _, unpack_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.raw_size == size and result.size > size  # random data does not compress
    assert pack_peak < size / 8, pack_peak
    assert unpack_peak < size / 8, unpack_peak
    assert sha256_file(tmp_path / "dst" / "big.dat") == sha256_file(src / "big.dat")


# --------------------------------------------------------------------------
# manifests


def test_snapshot_lists_regular_files_only(tmp_path: Path) -> None:
    src = make_tomodir(tmp_path / "src")
    os.symlink("grid/elem.dat", src / "link")
    snap = snapshot(src)
    assert "link" not in snap and "inv" not in snap
    assert snap["grid/elem.dat"] == ((src / "grid/elem.dat").stat().st_size, MTIME_NS)
    assert snap["config/spaced name ä.dat"] == (700, MTIME_NS + 5)
    assert pack(src, io.BytesIO()).manifest == snap, "crh_add takes its manifest from the pack"


def test_changed_since_finds_solver_output(tmp_path: Path) -> None:
    src = make_tomodir(tmp_path / "src")
    before = snapshot(src)
    write(src / "inv" / "rho01.mag", "result")
    write(src / "mod" / "volt.dat", "rewritten", MTIME_NS + 2)  # size differs
    write(src / "grid" / "elec.dat", "4\n1\n2\n3\n5\n", MTIME_NS + 99)  # same size, new mtime
    write(src / "exe" / "crtomo.cfg", "***FILES***\n", MTIME_NS + 3)  # unchanged
    (src / "new" / "empty").mkdir(parents=True)
    assert changed_since(src, before) == [
        "grid/elec.dat",
        "inv/rho01.mag",
        "mod/volt.dat",
        "new/empty",
        "rho",  # empty before and after: re-sent, which is harmless
    ]
    assert changed_since(src, snapshot(src)) == ["new/empty", "rho"]
