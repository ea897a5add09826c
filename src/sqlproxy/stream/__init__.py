"""WebSocket streaming (/api/v1/stream): the audit, query and metrics channels, the hub that feeds
them, and cross-node fan-out through Redis. The frame protocol is described in docs/stream.md."""
