"""Statement kinds and statement-level danger markers, keyed by pglast statement node class name.

Danger markers (``StatementAnalysis.dangers``): things a policy should refuse by default whatever
tables are involved, because they run code, touch the server's files, change identity or reach
beyond the database.

=====================  =========================================================================
marker                 statements
=====================  =========================================================================
do                     DO blocks (arbitrary procedural code)
create_function        CREATE/ALTER FUNCTION, PROCEDURE, AGGREGATE, OPERATOR, LANGUAGE, TRIGGER,
                       EVENT TRIGGER, RULE, CAST, TRANSFORM, ACCESS METHOD (code that runs later,
                       possibly as someone else)
alter_system           ALTER SYSTEM (server configuration on disk)
copy_program           COPY ... FROM/TO PROGRAM (shell command on the server)
copy_file              COPY ... FROM/TO 'file' (server file system)
load                   LOAD (loads a shared library)
create_extension       CREATE/ALTER EXTENSION, ALTER EXTENSION ADD/DROP
set_role               SET [LOCAL] ROLE / SESSION AUTHORIZATION, RESET ROLE / SESSION
                       AUTHORIZATION, RESET ALL, DISCARD ALL, SET/RESET "sqlproxy.*"
                       (identity changes)
security_label         SECURITY LABEL
create_server          foreign data wrappers, servers, user mappings, foreign tables,
                       IMPORT FOREIGN SCHEMA (reach other servers or files)
create_role            CREATE ROLE/USER/GROUP
alter_role             ALTER ROLE, ALTER ROLE SET, DROP ROLE, GRANT/REVOKE role membership,
                       REASSIGN OWNED, DROP OWNED
database               CREATE/ALTER/DROP DATABASE
tablespace             CREATE/ALTER/DROP TABLESPACE (server file system locations)
replication            CREATE/ALTER/DROP PUBLICATION/SUBSCRIPTION (subscriptions connect out)
vacuum_full            VACUUM FULL (rewrites tables under an exclusive lock)
database_wide          VACUUM/ANALYZE/CLUSTER/REINDEX with no relation named (whole database)
truncate_cascade       TRUNCATE ... CASCADE (truncates referencing tables not named)
server_file_function   a call of a function that reads or writes server files or large objects
                       (pg_read_file, pg_ls_dir, lo_import, lo_export, ...)
catalog_secrets        a read of a catalog column holding secrets or other users' data rather
                       than metadata: password hashes (pg_authid, pg_shadow), user-mapping
                       and subscription connection options, the sample values of column
                       statistics (pg_statistic, pg_stats, extended statistics), other
                       sessions' statements (pg_stat_activity.query), large object data
unanalyzed             a statement or FROM item whose node type the analyser does not know
=====================  =========================================================================

``set_config('search_path', ...)`` is a plain function call: it appears in ``functions`` and the
policy layer denies ``set_config`` by default; the analyser cannot follow a path set that way.
So does a set_config of ``role``, ``session_authorization`` or ``sqlproxy.*``, or of a name that
is not a literal. ``set_config('jit', 'off', false)`` (a literal, plain setting) is recorded in
``settings`` instead, and decided as ``SET jit``.
"""

from __future__ import annotations

from sqlproxy.sql.model import StatementKind

K = StatementKind

STATEMENT_KINDS: dict[str, StatementKind] = {
    "SelectStmt": K.SELECT,
    "InsertStmt": K.INSERT,
    "UpdateStmt": K.UPDATE,
    "DeleteStmt": K.DELETE,
    "MergeStmt": K.MERGE,
    "CopyStmt": K.COPY,
    "TruncateStmt": K.TRUNCATE,
    "GrantStmt": K.GRANT,
    "GrantRoleStmt": K.GRANT,
    "CreateRoleStmt": K.GRANT,
    "AlterRoleStmt": K.GRANT,
    "AlterRoleSetStmt": K.GRANT,
    "DropRoleStmt": K.GRANT,
    "AlterDefaultPrivilegesStmt": K.GRANT,
    "ReassignOwnedStmt": K.GRANT,
    "DropOwnedStmt": K.GRANT,
    "VariableSetStmt": K.SET,
    "VariableShowStmt": K.SHOW,
    "TransactionStmt": K.TRANSACTION,
    "ConstraintsSetStmt": K.TRANSACTION,
    "ExplainStmt": K.EXPLAIN,
    "PrepareStmt": K.PREPARE,
    "ExecuteStmt": K.EXECUTE,
    "DeallocateStmt": K.DEALLOCATE,
    "DoStmt": K.DO,
    "CallStmt": K.CALL,
    "ListenStmt": K.LISTEN,
    "UnlistenStmt": K.LISTEN,
    "NotifyStmt": K.NOTIFY,
    "LockStmt": K.LOCK,
    "VacuumStmt": K.MAINTENANCE,
    "ClusterStmt": K.MAINTENANCE,
    "ReindexStmt": K.MAINTENANCE,
    "CheckPointStmt": K.MAINTENANCE,
    "RefreshMatViewStmt": K.MAINTENANCE,
    "DiscardStmt": K.DISCARD,
    "DeclareCursorStmt": K.CURSOR,
    "FetchStmt": K.CURSOR,
    "ClosePortalStmt": K.CURSOR,
    "LoadStmt": K.OTHER,
    "SecLabelStmt": K.DDL,
    "CommentStmt": K.DDL,
    "RenameStmt": K.DDL,
    "RuleStmt": K.DDL,
    "ViewStmt": K.DDL,
    "IndexStmt": K.DDL,
    "DefineStmt": K.DDL,
    "CompositeTypeStmt": K.DDL,
    "ReplicaIdentityStmt": K.DDL,
    "ImportForeignSchemaStmt": K.DDL,
    "DropdbStmt": K.DDL,
    "CreatedbStmt": K.DDL,
}

# Every Create*/Alter*/Drop* statement not listed above is DDL.
DDL_PREFIXES = ("Create", "Alter", "Drop")

# Statement classes the analyser knows; anything else is OTHER and marked "unanalyzed".
KNOWN_STATEMENTS = frozenset(STATEMENT_KINDS)


def statement_kind(node_class: str) -> StatementKind | None:
    kind = STATEMENT_KINDS.get(node_class)
    if kind is None and node_class.startswith(DDL_PREFIXES) and node_class.endswith("Stmt"):
        return K.DDL
    return kind


STATEMENT_DANGERS: dict[str, str] = {
    "DoStmt": "do",
    "CreateFunctionStmt": "create_function",
    "AlterFunctionStmt": "create_function",
    "CreatePLangStmt": "create_function",
    "CreateTrigStmt": "create_function",
    "CreateEventTrigStmt": "create_function",
    "AlterEventTrigStmt": "create_function",
    "RuleStmt": "create_function",
    "CreateCastStmt": "create_function",
    "CreateTransformStmt": "create_function",
    "CreateAmStmt": "create_function",
    "AlterOperatorStmt": "create_function",
    "CreateConversionStmt": "create_function",
    "AlterSystemStmt": "alter_system",
    "LoadStmt": "load",
    "CreateExtensionStmt": "create_extension",
    "AlterExtensionStmt": "create_extension",
    "AlterExtensionContentsStmt": "create_extension",
    "SecLabelStmt": "security_label",
    "CreateFdwStmt": "create_server",
    "AlterFdwStmt": "create_server",
    "CreateForeignServerStmt": "create_server",
    "AlterForeignServerStmt": "create_server",
    "CreateUserMappingStmt": "create_server",
    "AlterUserMappingStmt": "create_server",
    "DropUserMappingStmt": "create_server",
    "CreateForeignTableStmt": "create_server",
    "ImportForeignSchemaStmt": "create_server",
    "CreateRoleStmt": "create_role",
    "AlterRoleStmt": "alter_role",
    "AlterRoleSetStmt": "alter_role",
    "DropRoleStmt": "alter_role",
    "GrantRoleStmt": "alter_role",
    "ReassignOwnedStmt": "alter_role",
    "DropOwnedStmt": "alter_role",
    "CreatedbStmt": "database",
    "AlterDatabaseStmt": "database",
    "AlterDatabaseSetStmt": "database",
    "AlterDatabaseRefreshCollStmt": "database",
    "DropdbStmt": "database",
    "CreateTableSpaceStmt": "tablespace",
    "AlterTableSpaceOptionsStmt": "tablespace",
    "DropTableSpaceStmt": "tablespace",
    "AlterTableMoveAllStmt": "tablespace",
    "CreatePublicationStmt": "replication",
    "AlterPublicationStmt": "replication",
    "CreateSubscriptionStmt": "replication",
    "AlterSubscriptionStmt": "replication",
    "DropSubscriptionStmt": "replication",
}

# DefineStmt covers CREATE AGGREGATE/OPERATOR/TYPE/COLLATION/TEXT SEARCH ...; only the first two
# attach code.
DEFINE_CODE_KINDS = frozenset({"OBJECT_AGGREGATE", "OBJECT_OPERATOR"})

# Catalog columns that hold secrets or other users' data, not metadata (``catalog_secrets``).
# PostgreSQL hides them per role, but every proxy user reaches the server as the proxy's one role
# (often a superuser): a rule granting pg_catalog reads for drivers' introspection must not hand
# out password hashes, sampled column values (a blocked salary column's most common values) or
# another user's statement with its literals. Read through a view, they show as the view's base
# columns, so pg_roles (which masks rolpassword) and pg_user stay plain reads.
CATALOG_SECRETS: dict[str, frozenset[str]] = {
    "pg_authid": frozenset({"rolpassword"}),
    "pg_shadow": frozenset({"passwd"}),
    "pg_user_mapping": frozenset({"umoptions"}),
    "pg_user_mappings": frozenset({"umoptions"}),
    "pg_subscription": frozenset({"subconninfo"}),
    "pg_statistic": frozenset(f"stavalues{i}" for i in range(1, 6)),
    "pg_stats": frozenset({"most_common_vals", "histogram_bounds", "most_common_elems"}),
    "pg_statistic_ext_data": frozenset({"stxdmcv", "stxdexpr"}),
    "pg_stats_ext": frozenset({"most_common_vals"}),
    "pg_stats_ext_exprs": frozenset({"most_common_vals", "histogram_bounds", "most_common_elems"}),
    "pg_stat_activity": frozenset({"query"}),
    "pg_largeobject": frozenset({"data"}),
}

# Functions reaching the server's file system or large objects (which lo_export writes out).
SERVER_FILE_FUNCTIONS = frozenset(
    {
        "pg_read_file",
        "pg_read_binary_file",
        "pg_ls_dir",
        "pg_stat_file",
        "pg_ls_logdir",
        "pg_ls_waldir",
        "pg_ls_tmpdir",
        "pg_ls_archive_statusdir",
        "pg_ls_logicalsnapdir",
        "pg_ls_logicalmapdir",
        "pg_ls_replslotdir",
        "pg_file_write",
        "pg_file_rename",
        "pg_file_unlink",
        "pg_file_sync",
        "lo_import",
        "lo_export",
    }
)
