"""Root's way to an embedded cluster: the OS account its server runs as, and what that account needs.

PostgreSQL refuses to run as root, so when root asks for a cluster the
server runs as an unprivileged OS user: the cluster's owner if it exists,
else ``CRH_EMBEDDED_USER``, else the distribution's ``postgres``, else a
``crh-embedded`` system user created here (useradd).  That user is given the
cluster's files and, on every ancestor of the data directory and of the
server binaries, the one permission bit it needs to pass through.  Root
still reaches the socket because root passes any permission check.

For any other user, nothing here applies: :func:`choose` returns None and
the server runs as the caller.
"""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import stat
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cr_queue.db.embedded.errors import EmbeddedError

log = logging.getLogger(__name__)

FALLBACK_USER = "crh-embedded"


@dataclass(frozen=True)
class ServerUser:
    """The OS account the server runs as when cr_queue itself runs as root."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]

    @classmethod
    def from_pwd(cls, entry: pwd.struct_passwd) -> ServerUser:
        groups = tuple(os.getgrouplist(entry.pw_name, entry.pw_gid))
        return cls(entry.pw_name, entry.pw_uid, entry.pw_gid, groups)


def choose(datadir: Path, initialized: bool, env: Mapping[str, str]) -> ServerUser | None:
    """None means "this process"; as root, the account the server runs as.

    An existing cluster keeps its owner; a new one goes to CRH_EMBEDDED_USER,
    else the distribution's ``postgres``, else a ``crh-embedded`` system user.
    """
    if os.geteuid() != 0:
        return None
    if initialized:
        owner = datadir.stat().st_uid
        if owner != 0:
            return ServerUser.from_pwd(pwd.getpwuid(owner))
    wanted = env.get("CRH_EMBEDDED_USER")
    for name in ([wanted] if wanted else ["postgres", FALLBACK_USER]):
        try:
            return ServerUser.from_pwd(pwd.getpwnam(name))
        except KeyError:
            if wanted:
                raise EmbeddedError(
                    f"CRH_EMBEDDED_USER={wanted} is not an OS user; create it or unset "
                    "CRH_EMBEDDED_USER (PostgreSQL cannot run as root)"
                ) from None
    return ServerUser.from_pwd(create_system_user(FALLBACK_USER))


def name_of(datadir: Path, initialized: bool) -> str | None:
    """Who runs (or would run) the server, without creating anyone."""
    if os.geteuid() != 0:
        uid = os.geteuid()
    elif initialized:
        uid = datadir.stat().st_uid
    else:
        return None
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def run_as(user: ServerUser, datadir: Path, binary: str, env: dict[str, str]) -> dict[str, object]:
    """Prepare running ``binary`` as ``user``: reachable paths, its HOME and names in
    ``env``; the keyword arguments that make subprocess switch to it (no shell, no runuser)."""
    # Checked before every command, not once: tools such as pytest
    # reset their temp roots to 0700 while our server keeps running.
    grant_traverse(datadir, user)
    grant_traverse(Path(binary), user)
    env["HOME"] = str(datadir)
    env["USER"] = env["LOGNAME"] = user.name
    return {"user": user.uid, "group": user.gid, "extra_groups": list(user.groups)}


def make_private_dir(path: Path, user: ServerUser | None) -> None:
    path.mkdir(parents=True, exist_ok=True)
    own(path, user, 0o700)


def own(path: Path, user: ServerUser | None, mode: int) -> None:
    """Give ``path`` to the server's user (when that is not this process) with ``mode``."""
    if user is not None:
        os.chown(path, user.uid, user.gid)
    os.chmod(path, mode)


def grant_traverse(path: Path, user: ServerUser) -> list[Path]:
    """Let the server user pass through every ancestor of ``path``, and no more.

    Only the execute (search) bit of the class the user falls in is added:
    it may enter the directories but cannot list them.
    """
    granted: list[Path] = []
    for ancestor in reversed(Path(path).absolute().parents):
        info = ancestor.stat()
        if info.st_uid == user.uid:
            bit = stat.S_IXUSR
        elif info.st_gid in user.groups:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if info.st_mode & bit:
            continue
        os.chmod(ancestor, stat.S_IMODE(info.st_mode) | bit)
        granted.append(ancestor)
    if granted:
        log.warning(
            "gave OS user %s traverse-only permission (x, not read) on %s so the embedded "
            "PostgreSQL server can reach %s",
            user.name, ", ".join(map(str, granted)), path,
        )
    return granted


def create_system_user(name: str) -> pwd.struct_passwd:
    """Only when root and no ``postgres`` user exists: someone must own the cluster."""
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    try:
        result = subprocess.run(
            [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
            capture_output=True, text=True, timeout=60,
        )
        detail = result.stderr.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        result, detail = None, str(exc)
    # Exit code 9: another command created the same user a moment ago.
    if result is None or result.returncode not in (0, 9):
        raise EmbeddedError(
            f"cannot create the system user {name} to run the embedded PostgreSQL server "
            f"as (PostgreSQL refuses to run as root): {detail}; create an unprivileged user "
            "and set CRH_EMBEDDED_USER to it, or run cr_queue as a normal user"
        )
    if result.returncode == 0:
        log.warning("created system user %s to run the embedded PostgreSQL server", name)
    return pwd.getpwnam(name)
