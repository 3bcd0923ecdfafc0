"""Naming jobs the way users do: by tomodir path, by .crh file, or by job id."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cr_queue.tomodir import control


@dataclass
class Selection:
    ids: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    # Directories with no .crh here or below (each also a problem): not added, or retrieved already.
    bare: list[str] = field(default_factory=list)


def select(targets: list[str]) -> Selection:
    """Turn command-line targets into job ids.

    A plain number is a job id unless a file or directory of that name exists;
    a .crh file names its job; a tomodir with a .crh beside it names that job;
    any other directory names every job whose .crh lies below it.
    """
    selection = Selection()
    for target in targets:
        path = Path(target)
        if target.isdigit() and not path.exists():
            selection.ids.append(int(target))
            continue
        if not path.exists():
            selection.problems.append(
                f"{target}: neither a job id nor an existing path; give a job id, a tomodir or its .crh file"
            )
            continue
        # A registered tomodir names its own job, not those of tomodirs below it.
        sibling = control.control_path(path) if path.is_dir() else None
        found = control.gather([sibling if sibling is not None and sibling.exists() else path])
        if not found.files and not found.problems:
            selection.problems.append(
                f"{target}: no .crh file here or below: not added with crh_add, or retrieved already "
                "(crh show finds the jobs of a retrieved tomodir by its path)"
            )
            selection.bare.append(target)
        selection.problems.extend(found.problems)
        selection.ids.extend(cf.job_id for _, cf in found.readable)
    selection.ids = sorted(set(selection.ids))
    return selection
