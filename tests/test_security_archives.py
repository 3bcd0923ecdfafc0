"""Archives are untrusted both ways, shown through the real worker and crh_retrieve.

tests/test_archive.py rejects every crafted member type at the unpacker
(absolute names, ``..``, symlinks and hard links leaving the tree, writes
through symlinks, devices and FIFOs, setuid bits, member and size caps, a
bomb by its header, oversized metadata) and has the hypothesis property that
random member names and types never write outside the target.  Here the same
archives arrive as a scientist's input on a worker and as a node's result in
crh_retrieve: the job fails (the process does not), the message names the
member and the reason, nothing is written outside, and a corrupted archive
is refused before a byte is unpacked.
"""

from __future__ import annotations

import hashlib
import io
import json
import secrets
import tarfile
from pathlib import Path

import psycopg
import pytest
import zstandard

from cr_queue.queries import jobs, workers
from cr_queue import store
from cr_queue.tomodir import synth

from .conftest import run, script
from .test_security_roles import ALICE, NODE, connect_as, logins, url_as  # noqa: F401  (fixture)

TOKEN = "escaped-" + secrets.token_hex(4)


def _tar(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return zstandard.ZstdCompressor().compress(raw.getvalue())


def _member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes | None = b"x", **kw) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    for key, value in kw.items():
        setattr(info, key, value)
    if kind == tarfile.REGTYPE:
        info.size = len(data or b"")
        return info, data
    return info, None


def _dir(name: str) -> tuple[tarfile.TarInfo, None]:
    return _member(name, tarfile.DIRTYPE, mode=0o755)


HOSTILE = {
    "dotdot": (_tar(_dir("exe"), _member(f"../../{TOKEN}")), f"../../{TOKEN}"),
    "absolute": (_tar(_member(f"/tmp/{TOKEN}")), f"/tmp/{TOKEN}"),
    "symlink-out": (_tar(_member("exe", tarfile.SYMTYPE, linkname="/tmp"), _member(f"exe/{TOKEN}")), "exe"),
    "hardlink-out": (_tar(_member("passwd", tarfile.LNKTYPE, linkname="/etc/passwd")), "passwd"),
    "fifo": (_tar(_member("exe/fifo", tarfile.FIFOTYPE)), "exe/fifo"),
    "device": (_tar(_member("exe/dev", tarfile.CHRTYPE, devmajor=1, devminor=3)), "exe/dev"),
    # 8 MB of zeros: some kB compressed, over the 1M this worker's config allows
    "bomb": (_tar(_member("exe/zeros", data=bytes(8 << 20))), "exe/zeros"),
}


def _upload(conn: psycopg.Connection, payload: bytes) -> str:
    writer = store.BlobWriter(conn)
    writer.write(payload)
    return writer.seal(hashlib.sha256(payload).hexdigest(), len(payload))


def _register(conn: psycopg.Connection, path: str, sha: str) -> int:
    new = jobs.NewJob(
        sim_type="mod", model_first=False, source_path=path, crh_file=path + ".crh", username="alice", source_computer="ws1"
    )
    actor = jobs.Actor(os_user="alice", host="ws1", pid=1)
    job_id = jobs.begin_registration(conn, new, actor)
    assert jobs.finish_registration(conn, job_id, sha, actor)
    return job_id


def _nothing_escaped(*roots: Path) -> None:
    """The crafted names aim at the test's own directories, /tmp (via a symlink) and /."""
    for root in roots:
        assert not list(root.glob(f"**/{TOKEN}")), f"{TOKEN} written below {root}"
    for place in (Path("/tmp") / TOKEN, Path("/") / TOKEN):
        assert not place.exists(), f"{place} was written"


def test_hostile_inputs_fail_their_jobs_and_the_worker_carries_on(db_url, logins, cli_env, tmp_path):
    jobs = {}
    with connect_as(db_url, ALICE) as alice:
        for case, (payload, _member_name) in HOSTILE.items():
            jobs[case] = _register(alice, f"/home/alice/{case}", _upload(alice, payload))
    good = tmp_path / "good"
    synth.make_tree(good, n_mod=1)
    run([script("crh_add")], {**cli_env, "CRH_DATABASE_URL": url_as(db_url, ALICE)}, cwd=good)
    config = tmp_path / "node.toml"
    config.write_text('[archive]\nmax_unpacked_size = "1M"\nmax_members = 1000\n')
    workdir = tmp_path / "work"
    workdir.mkdir()
    node = {**cli_env, "CRH_DATABASE_URL": url_as(db_url, NODE), "CRH_CONFIG": str(config)}
    proc = run([script("crh_worker"), "-q", "--json", "--workdir", str(workdir)], node, check=None)
    assert proc.returncode in (0, 1), proc.stderr
    assert "Traceback" not in proc.stderr
    report = json.loads(proc.stdout)
    assert report["finished"] == 1 and report["failed"] == len(HOSTILE)
    with psycopg.connect(db_url) as owner:
        for case, job_id in jobs.items():
            status, category, reason = owner.execute(
                "SELECT status, failure_category, failure_reason FROM inversions WHERE id = %s", (job_id,)
            ).fetchone()
            member = HOSTILE[case][1]
            assert (status, category) == ("failed", "input_archive"), (case, reason)
            assert repr(member) in reason, (case, reason)
        bomb = owner.execute("SELECT failure_reason FROM inversions WHERE id = %s", (jobs["bomb"],)).fetchone()[0]
    assert "exceed the limit of 1048576 bytes" in bomb
    _nothing_escaped(tmp_path, workdir)
    assert list(workdir.iterdir()) == []


def _finished_with_result(db_url: str, tmp_path: Path, cli_env: dict, result: bytes) -> tuple[Path, int, str]:
    """alice adds a tomodir; a node claims it and returns ``result`` as its result archive."""
    tree = tmp_path / "tree"
    synth.make_tree(tree, n_mod=1)
    alice_env = {**cli_env, "CRH_DATABASE_URL": url_as(db_url, ALICE)}
    (added,) = json.loads(run([script("crh_add"), "--json"], alice_env, cwd=tree).stdout)["added"]
    with connect_as(db_url, NODE) as node:
        wid = workers.register_worker(node, name="n", host="node01", pid=9, version="t", jobs=1, threads=1, groups=[], solvers={})
        actor = jobs.Actor(os_user="crh", host="node01", pid=9, worker_id=wid)
        job = jobs.claim(node, actor=actor, can_mod=True, can_inv=True, lease_s=60)
        assert job is not None and job.id == added["job_id"]
        sha = _upload(node, result)
        assert jobs.complete(node, job, result_sha256=sha, exit_code=0, actor=actor)
    return Path(added["path"]), job.id, sha


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("case", ["dotdot", "symlink-out", "hardlink-out", "fifo"])
def test_a_hostile_result_is_refused_by_crh_retrieve(db_url, logins, cli_env, tmp_path, case):
    payload, member = HOSTILE[case]
    tomodir, job_id, _sha = _finished_with_result(db_url, tmp_path, cli_env, payload)
    before = _snapshot(tmp_path)
    alice_env = {**cli_env, "CRH_DATABASE_URL": url_as(db_url, ALICE)}
    proc = run([script("crh_retrieve")], alice_env, cwd=tmp_path / "tree", check=1)
    assert f"job {job_id}'s result cannot be used" in proc.stderr and repr(member) in proc.stderr
    assert "Traceback" not in proc.stderr
    assert _snapshot(tmp_path) == before  # the tomodir and its .crh untouched, nothing beside them
    _nothing_escaped(tmp_path)


def test_a_corrupted_archive_is_refused_before_anything_is_unpacked(db_url, logins, cli_env, tmp_path):
    good = _tar(_dir("mod"), _member("mod/volt.dat", data=b"1\n1 2 3 4\n"))
    tomodir, job_id, sha = _finished_with_result(db_url, tmp_path, cli_env, good)
    with psycopg.connect(db_url) as owner:  # storage corruption (or tampering) after the upload
        flipped = owner.execute(
            "UPDATE binary_data SET data = set_byte(data, 9, get_byte(data, 9) # 1) "
            "WHERE blob_id = (SELECT id FROM blobs WHERE sha256 = %s) AND chunk_no = 0",
            (sha,),
        )
        assert flipped.rowcount == 1
    before = _snapshot(tmp_path)
    alice_env = {**cli_env, "CRH_DATABASE_URL": url_as(db_url, ALICE)}
    proc = run([script("crh_retrieve")], alice_env, cwd=tmp_path / "tree", check=1)
    assert "checksum mismatch" in proc.stderr and sha in proc.stderr
    assert _snapshot(tmp_path) == before
    assert not (tomodir / "mod" / "volt.dat").exists()


def test_archive_limits_in_the_config_are_checked(cli_env, tmp_path):
    config = tmp_path / "config.toml"
    for text, message in (
        ('[archive]\nmax_unpacked_size = "lots"\n', "is not a positive size"),
        ("[archive]\nmax_members = 0\n", "is not a positive whole number"),
        ("[archive]\nmax_files = 10\n", "is not a setting"),
        ('archive = "big"\n', "must be a table"),
    ):
        config.write_text(text)
        proc = run([script("crh"), "db", "url"], {**cli_env, "CRH_CONFIG": str(config)}, cwd=tmp_path, check=2)
        assert message in proc.stderr and str(config) in proc.stderr
