"""What is dangerous whatever the tables: statement markers and built-in functions.

A wildcard never grants these. A statement carrying a danger marker needs a database-level rule
whose ``statements`` names the marker; a call to a dangerous function needs a rule whose
``functions`` names it (a glob such as ``pg_ls_*`` counts; a bare ``*`` does not).

Statement markers (``StatementAnalysis.dangers``, emitted by the analyser). The analyser may emit
markers not listed here; the engine treats every marker as dangerous, so an unlisted one is denied
until it is added here (a rule may only name listed markers, so that a typo in a rule is an error
rather than a silently inert rule).

Dangerous functions, by why they are dangerous:

* **Server file system.** ``pg_read_file``, ``pg_read_binary_file``, ``pg_stat_file``, the
  ``pg_ls_*dir`` family and adminpack's ``pg_file_*`` / ``pg_logdir_ls`` read, list or write files
  on the database server, outside every table policy.
* **Large objects.** ``lo_*``, ``loread``, ``lowrite``: ``lo_import`` / ``lo_export`` move server
  files in and out, and large objects are storage that no table rule covers.
* **SQL from strings, tables by name.** ``query_to_xml*`` and ``cursor_to_xml*`` run a query
  given as text; ``table_to_xml*``, ``schema_to_xml*`` and ``database_to_xml*`` read relations
  named by a string the analyser cannot see as a relation; ``ts_stat`` and ``ts_rewrite`` run a
  query given as text; ``dblink*`` runs SQL on another connection (possibly as another role).
  All of these bypass the relation checks.
* **Change streams.** ``pg_logical_slot_*`` and the replication-slot functions read every change
  in the database, outside table policy, and slots pin WAL (disk exhaustion).
* **Session and server control.** ``set_config`` (the function form of SET: it would bypass a
  rule on SET, e.g. of ``search_path`` or ``role``; a call naming a plain setting as a literal
  is not recorded as this function but decided as that SET, see ``sql.walker.plain_setting``),
  configuration reload, log rotation, backend
  termination and cancellation, promotion, WAL switching, backups and restore points, statistics
  resets, replication origins, WAL replay control, ``pg_notify`` (the function form of NOTIFY),
  ``pg_log_backend_memory_contexts``, ``pg_import_system_collations``, ``binary_upgrade_*``.
* **Denial of service by sleeping.** ``pg_sleep``, ``pg_sleep_for``, ``pg_sleep_until`` hold a
  backend (and a pool connection) for as long as asked.

Not listed on purpose: advisory locks (``pg_advisory_*``) are ordinary application tools; set-
returning generators (``generate_series``) are bounded by the cost check, not by policy.

Matching: names are compared lower-case, with or without a ``pg_catalog.`` qualification. An
unqualified name is treated as the built-in because PostgreSQL searches ``pg_catalog`` first
(unless a search_path lists it later, which only makes the conservative reading safer). A name
qualified with another schema (``myschema.pg_read_file``) is a user function, not the built-in.
"""

from __future__ import annotations

import fnmatch
import re

DANGER_MARKERS: frozenset[str] = frozenset(
    {
        "do",  # anonymous code block: arbitrary procedural code
        "create_function",  # CREATE FUNCTION / PROCEDURE: code that later runs with its owner's rights
        "alter_function",  # e.g. SECURITY DEFINER, or a body's search_path
        "create_language",
        "create_trigger",  # code that runs on other users' writes
        "create_event_trigger",
        "create_rule",  # query rewrite rules on a table
        "create_extension",
        "alter_system",
        "copy_program",  # COPY ... TO/FROM PROGRAM: a shell command on the server
        "copy_file",  # COPY ... TO/FROM 'file': the server's file system
        "load",  # LOAD 'library'
        "set_role",  # SET ROLE / SET SESSION AUTHORIZATION: whose rights the server applies
        "role_management",  # CREATE / ALTER / DROP ROLE, GRANT role TO role
        "create_server",  # foreign servers, wrappers and user mappings: connections elsewhere
        "create_foreign_data_wrapper",
        "user_mapping",
        "create_subscription",  # connects out and writes tables
        "security_label",
        "create_tablespace",  # a server directory
        "prepare_transaction",  # outlives the session and holds its locks
        "catalog_secrets",  # password hashes, sampled column values, other sessions' statements
    }
)

_DANGEROUS_GLOBS: tuple[str, ...] = (
    # server file system
    "pg_read_file",
    "pg_read_binary_file",
    "pg_stat_file",
    "pg_ls_*",
    "pg_file_*",
    "pg_logdir_ls",
    # large objects
    "lo_*",
    "loread",
    "lowrite",
    # other sessions' statements, with their literals (every proxy user is the same server role)
    "pg_stat_get_activity",
    "pg_stat_get_backend_activity",
    # SQL from strings, tables by name
    "query_to_xml*",
    "cursor_to_xml*",
    "table_to_xml*",
    "schema_to_xml*",
    "database_to_xml*",
    "ts_stat",
    "ts_rewrite",
    "dblink*",
    # change streams and replication
    "pg_logical_slot_*",
    "pg_logical_emit_message",
    "pg_create_physical_replication_slot",
    "pg_create_logical_replication_slot",
    "pg_drop_replication_slot",
    "pg_copy_physical_replication_slot",
    "pg_copy_logical_replication_slot",
    "pg_replication_slot_advance",
    "pg_replication_origin_*",
    # session and server control
    "set_config",
    "pg_reload_conf",
    "pg_rotate_logfile",
    "pg_terminate_backend",
    "pg_cancel_backend",
    "pg_promote",
    "pg_switch_wal",
    "pg_switch_xlog",
    "pg_create_restore_point",
    "pg_start_backup",
    "pg_stop_backup",
    "pg_backup_start",
    "pg_backup_stop",
    "pg_wal_replay_*",
    "pg_stat_reset*",
    "pg_stat_statements_reset",
    "pg_notify",
    "pg_log_backend_memory_contexts",
    "pg_import_system_collations",
    "binary_upgrade_*",
    # denial of service
    "pg_sleep",
    "pg_sleep_for",
    "pg_sleep_until",
)

_DANGEROUS_RE = re.compile("|".join(fnmatch.translate(g) for g in _DANGEROUS_GLOBS))


def split_function(name: str) -> tuple[str | None, str]:
    """``(schema, bare_name)`` of a called function name, lower-cased; ``pg_catalog`` is reported
    as ``None`` because it is what an unqualified name resolves to first."""
    low = name.lower()
    schema, dot, bare = low.rpartition(".")
    if not dot:
        return None, low
    # A three-part name is catalog.schema.function; only the schema matters.
    schema = schema.rpartition(".")[2]
    if schema == "pg_catalog":
        return None, bare
    return schema, bare


def is_dangerous_function(name: str) -> bool:
    """True when ``name`` (as the analyser reports it) is a dangerous built-in."""
    schema, bare = split_function(name)
    return schema is None and _DANGEROUS_RE.match(bare) is not None
