"""The .crh control file: paths, atomic writes, helpful errors, discovery."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import pytest

from cr_queue.tomodir import control
from cr_queue.tomodir.control import ControlFile, ControlFileError


def sample(tomodir: str = "/data/site/td_01") -> ControlFile:
    return ControlFile(
        job_id=42,
        sim_type="inv",
        crh_file=tomodir + ".crh",
        tomodir=tomodir,
        source_computer="ws17",
        username="mweigand",
        datetime_init="2025-03-01T12:00:00+00:00",
        archive_sha256="ab" * 32,
        manifest={"grid/elem.dat": [1234, 1_600_000_000_123_456_789], "exe/crtomo.cfg": [10, 1]},
    )


@pytest.mark.parametrize("given", ["/data/site/td_01", "/data/site/td_01/", "/data/site/./td_01//"])
def test_control_path_is_a_sibling(given: str) -> None:
    assert control.control_path(Path(given)) == Path("/data/site/td_01.crh")
    assert control.control_path(given) == Path("/data/site/td_01.crh")


def test_control_path_of_current_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "td").mkdir()
    monkeypatch.chdir(tmp_path / "td")
    assert control.control_path(Path(".")) == tmp_path / "td.crh"


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "td_01.crh"
    control.write(sample(), path)
    assert control.read(path) == sample()
    assert json.loads(path.read_text())["job_id"] == 42


def test_write_replaces_atomically_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "td_01.crh"
    control.write(sample(), path)
    newer = sample()
    newer.job_id = 43
    control.write(newer, path)
    assert control.read(path).job_id == 43
    assert sorted(p.name for p in tmp_path.iterdir()) == ["td_01.crh"]


def test_failed_write_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "td_01.crh"
    control.write(sample(), path)

    def crash(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(control.os, "replace", crash)
    broken = sample()
    broken.job_id = 99
    with pytest.raises(OSError, match="disk full"):
        control.write(broken, path)
    assert control.read(path).job_id == 42
    assert sorted(p.name for p in tmp_path.iterdir()) == ["td_01.crh"]


def test_unknown_keys_are_ignored(tmp_path: Path) -> None:
    path = tmp_path / "td.crh"
    data = asdict(sample()) | {"added_in_future": {"x": 1}}
    path.write_text(json.dumps(data))
    assert control.read(path) == sample()


def test_missing_version_means_version_one(tmp_path: Path) -> None:
    path = tmp_path / "td.crh"
    data = asdict(sample())
    del data["version"]
    path.write_text(json.dumps(data))
    assert control.read(path).version == 1


def error_for(tmp_path: Path, text: str) -> str:
    path = tmp_path / "td_01.crh"
    path.write_text(text)
    with pytest.raises(ControlFileError) as info:
        control.read(path)
    message = str(info.value)
    assert str(path) in message
    return message


def test_invalid_json_names_line_and_remedy(tmp_path: Path) -> None:
    text = json.dumps(asdict(sample()), indent=2).replace('"sim_type": "inv",', '"sim_type": inv,')
    message = error_for(tmp_path, text)
    assert "not valid JSON at line 3" in message
    assert "delete it and run crh_add again" in message


@pytest.mark.parametrize("key", ["job_id", "tomodir", "archive_sha256", "manifest"])
def test_missing_key(tmp_path: Path, key: str) -> None:
    data = asdict(sample())
    del data[key]
    message = error_for(tmp_path, json.dumps(data))
    assert f"missing key {key!r}" in message and "crh_add" in message


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("job_id", "42", "must be int, not str"),
        ("job_id", True, "must be int, not bool"),
        ("username", None, "must be str, not null"),
        ("manifest", [], "must be dict, not list"),
        ("manifest", {"a": [1]}, "manifest entry 'a' must be [size, mtime_ns]"),
        ("manifest", {"a": ["1", 2]}, "manifest entry 'a'"),
        ("version", "1", "must be int, not str"),
    ],
)
def test_wrong_types(tmp_path: Path, key: str, value: object, expected: str) -> None:
    data = asdict(sample()) | {key: value}
    assert expected in error_for(tmp_path, json.dumps(data))


def test_not_an_object(tmp_path: Path) -> None:
    assert "expected a JSON object, found list" in error_for(tmp_path, "[1, 2]")


def test_newer_version_asks_for_upgrade(tmp_path: Path) -> None:
    data = asdict(sample()) | {"version": 2}
    assert "upgrade cr_queue" in error_for(tmp_path, json.dumps(data))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ControlFileError, match="does not exist"):
        control.read(tmp_path / "nope.crh")


def test_find_walks_trees_skipping_hidden_and_symlinked_dirs(tmp_path: Path) -> None:
    site = tmp_path / "site"
    for rel in ["td_01.crh", "sub/td_02.crh", "sub/deeper/td_03.crh", ".hidden/td_04.crh", "notes.txt"]:
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_text("{}")
    (site / "td_01").mkdir()
    os.symlink(site / "sub", site / "loop")
    single = tmp_path / "single.crh"
    single.write_text("{}")
    assert control.find([site, single, site / "sub"]) == sorted(
        [site / "td_01.crh", site / "sub" / "td_02.crh", site / "sub" / "deeper" / "td_03.crh", single]
    )


def test_find_includes_the_control_file_of_a_given_tomodir(tmp_path: Path) -> None:
    (tmp_path / "td_01").mkdir()
    (tmp_path / "td_01.crh").write_text("{}")
    (tmp_path / "td_02.crh").write_text("{}")
    assert control.find([tmp_path / "td_01"]) == [tmp_path / "td_01.crh"]


def test_find_names_missing_paths(tmp_path: Path) -> None:
    with pytest.raises(ControlFileError, match="missing_dir"):
        control.find([tmp_path / "missing_dir"])


def test_find_rejects_other_files(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("")
    with pytest.raises(ControlFileError, match="neither a directory nor"):
        control.find([tmp_path / "notes.txt"])


def test_remove_is_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "td.crh"
    control.write(sample(), path)
    control.remove(path)
    control.remove(path)
    assert not path.exists()


def test_cr_hydra_control_file_is_recognised(tmp_path):
    import json

    import pytest

    from cr_queue.tomodir import control

    old = tmp_path / "td.crh"
    old.write_text(json.dumps({"sim_id": 17, "sim_type": "inv", "crh_file": str(old)}))
    with pytest.raises(control.ControlFileError, match="written by cr_hydra .job 17.*do not delete"):
        control.read(old)


@pytest.mark.parametrize("manifest", [{}, {"inv/a.dat": [12, 1_700_000_000_123_456_789], 'ü "odd" name': [0, 5]}])
def test_rendered_text_is_the_indented_json_of_the_fields(manifest):
    cf = ControlFile(
        job_id=5, sim_type="inv", crh_file="/x/td.crh", tomodir="/x/td", source_computer="h",
        username="ü", datetime_init="2026-01-01T00:00:00+00:00", archive_sha256="ab" * 32, manifest=manifest,
    )
    assert control.render(cf) == json.dumps(asdict(cf), indent=2) + "\n"
