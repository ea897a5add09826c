"""Shared test configuration.

The server fixtures (pg_server, pg_dsn, demo_dsn, pg_factory, redis_server, redis_url,
fresh_redis) live in tests/fix_servers.py, loaded as a plugin with `-p tests.fix_servers`, so
bench/ and other suites can load them the same way without this conftest.
"""
