"""Atomic directory exchange and hard-link copies (pure, no database)."""

from __future__ import annotations

import os

from cr_queue.tomodir import swap


def test_link_copy_exchange_reconcile(tmp_path):
    src = tmp_path / "td"
    (src / "inv").mkdir(parents=True)
    (src / "exe").mkdir()
    (src / "exe" / "crtomo.cfg").write_text("cfg")
    os.symlink("crtomo.cfg", src / "exe" / "link")
    os.chmod(src / "exe", 0o750)
    new = tmp_path / ".td.new"
    swap.link_copy(src, new)
    assert (new / "inv").is_dir()
    assert os.stat(new / "exe" / "crtomo.cfg").st_ino == os.stat(src / "exe" / "crtomo.cfg").st_ino
    assert os.readlink(new / "exe" / "link") == "crtomo.cfg"
    assert os.stat(new / "exe").st_mode & 0o777 == 0o750
    (new / "inv" / "inv.ctr").write_text("***finished***\n")
    # The user creates a file while the copy is being assembled.
    (src / "notes.txt").write_text("mine")
    swap.exchange(new, src)
    assert (src / "inv" / "inv.ctr").exists() and not (src / "notes.txt").exists()
    moved = swap.reconcile(new, src)
    assert moved == ["notes.txt"] and (src / "notes.txt").read_text() == "mine"
    assert not new.exists()
    assert (src / "exe" / "crtomo.cfg").read_text() == "cfg"
