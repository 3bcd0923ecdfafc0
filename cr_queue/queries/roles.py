"""Database roles of a shared installation: the SQL behind `crh db grant-user/grant-worker`.

Migration 0003 creates three group roles and the row-level security that
binds them; a login is given exactly one of them:

* ``crh_user``   a scientist: registers jobs and sees, cancels, requeues,
  reprioritises and retrieves only the jobs its own login registered;
* ``crh_worker`` a compute node: claims and runs any queued job, reads the
  input archives of the jobs it holds, writes results; cannot delete jobs;
* ``crh_admin``  everything (the table owner, who runs ``crh db upgrade``,
  is exempt from row security anyway).

Role names are identifiers, never parameters, so they are quoted with
:class:`psycopg.sql.Identifier` after :func:`check_login_name` accepted them
(``roles.sql``'s ``{login}`` and ``{group}``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import psycopg
from psycopg import errors, sql

from cr_queue.queries import loader

SQL = loader.load("roles")

ADMIN = "crh_admin"
WORKER = "crh_worker"
USER = "crh_user"
GROUPS = (ADMIN, WORKER, USER)

# PostgreSQL truncates identifiers to 63 bytes; a longer login name would silently become another.
MAX_NAME_BYTES = 63
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.@-]*")
_RESERVED = {"public", "none", "all", "current_user", "session_user", "current_role", "user"}


class RoleError(Exception):
    """A role cannot be created or granted; the message says why and what to do."""


@dataclass(frozen=True)
class Grant:
    name: str
    group: str
    created: bool
    already_member: bool
    can_login: bool
    also: tuple[str, ...]


def check_login_name(name: str) -> str:
    """Accept a login role name, or say which rule it breaks."""
    if not name:
        raise RoleError("the role name is empty; give the login name, e.g. `crh db grant-user alice`")
    if not _NAME.fullmatch(name):
        raise RoleError(
            f"{name!r} is not a usable login name: use letters, digits, '_', '.', '@' or '-', "
            "starting with a letter or '_' (usually the person's or the node's Unix account name)"
        )
    if len(name.encode()) > MAX_NAME_BYTES:
        raise RoleError(f"{name!r} is longer than PostgreSQL's {MAX_NAME_BYTES} bytes for a role name")
    if name.lower() in _RESERVED or name.lower().startswith("pg_"):
        raise RoleError(f"{name!r} is reserved by PostgreSQL; choose another login name")
    if name in GROUPS:
        raise RoleError(f"{name!r} is one of cr_queue's group roles; give the login that should join it")
    return name


def grant(conn: psycopg.Connection, name: str, group: str) -> Grant:
    """Create the login role ``name`` if it is missing (no password) and make it a member of ``group``."""
    check_login_name(name)
    if group not in GROUPS:
        raise ValueError(group)
    if not conn.execute(SQL.group_exists, {"group": group}).fetchone()[0]:
        raise RoleError(
            f"the group role {group} does not exist in this cluster: run `crh db upgrade` first "
            "(as the database owner, with CREATEROLE)"
        )
    row = None
    try:
        with conn.transaction():
            row = conn.execute(SQL.role, {"name": name}).fetchone()
            created = row is None
            if created:
                conn.execute(sql.SQL(SQL.create_login).format(login=sql.Identifier(name)))
                can_login = True
            else:
                can_login = bool(row[0])
            before = [r[0] for r in conn.execute(SQL.member_of, {"name": name, "groups": list(GROUPS)})]
            already = group in before
            if not already:
                grant_group = sql.SQL(SQL.grant_group).format(group=sql.Identifier(group), login=sql.Identifier(name))
                conn.execute(grant_group)
    except errors.InsufficientPrivilege as exc:
        who = conn.info.user
        raise RoleError(
            f"{who} may not {'create the role ' + name + ' or ' if row is None else ''}grant {group} to {name} "
            f"({exc.diag.message_primary}): run this as a superuser, or as a role with CREATEROLE "
            f"that has ADMIN OPTION on {group}"
        ) from None
    return Grant(
        name=name,
        group=group,
        created=created,
        already_member=already,
        can_login=can_login,
        also=tuple(g for g in before if g != group),
    )


def access(conn: psycopg.Connection) -> str:
    """What the connected role sees: 'admin' (or owner, or superuser): every row;
    'worker': every job, archives of held jobs; 'user': own jobs only; 'none'."""
    row = conn.execute(SQL.access).fetchone()
    admin, owner, worker, user = row
    if admin or owner:
        return "admin"
    if worker:
        return "worker"
    if user:
        return "user"
    return "none"
