-- Database roles of a shared installation: the statements behind
-- `crh db grant-user/grant-worker` (wrappers: cr_queue/queries/roles.py).
--
-- Role names are identifiers, never parameters: {login} and {group} are
-- filled in by psycopg.sql.Identifier (quoted) after roles.check_login_name
-- accepted the name, the only statements of the query layer composed so.

-- name: group_exists
-- Whether a group role exists in this cluster (migration 0003 creates them).
SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = %(group)s);

-- name: role
-- Whether a role may log in and whether it is a superuser; no row when there is no such role.
SELECT rolcanlogin, rolsuper FROM pg_roles WHERE rolname = %(name)s;

-- name: member_of
-- Which of the given group roles a role is a member of.
SELECT g.rolname
FROM pg_auth_members m
JOIN pg_roles g ON g.oid = m.roleid
JOIN pg_roles u ON u.oid = m.member
WHERE u.rolname = %(name)s AND g.rolname = ANY(%(groups)s::text[])
ORDER BY 1;

-- name: create_login
-- Create a login role without a password (peer, certificate or .pgpass authentication).
CREATE ROLE {login} LOGIN;

-- name: grant_group
-- Make a login a member of one of cr_queue's group roles.
GRANT {group} TO {login};

-- name: access
-- Which of cr_queue's group roles the caller has (one that does not exist counts as not had), and whether it owns the tables.
SELECT coalesce(bool_or(pg_has_role(g.oid, 'USAGE')) FILTER (WHERE g.rolname = 'crh_admin'), false) AS admin,
       pg_has_role((SELECT relowner FROM pg_class WHERE oid = 'inversions'::regclass), 'USAGE') AS owner,
       coalesce(bool_or(pg_has_role(g.oid, 'USAGE')) FILTER (WHERE g.rolname = 'crh_worker'), false) AS worker,
       coalesce(bool_or(pg_has_role(g.oid, 'USAGE')) FILTER (WHERE g.rolname = 'crh_user'), false) AS user
FROM pg_roles g
WHERE g.rolname IN ('crh_admin', 'crh_worker', 'crh_user');
