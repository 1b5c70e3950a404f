"""The Ray service (stage 4): shard servers, GPU workers and the driver that places them.

Owns the placement plan (`placement`, a plain function), the shard server (`shard_server`, a
plain class), the thin Ray actors and the reader that joins them (`actors`), and `connect()`
(`driver`). May import every lower stage and Ray; never serve, jobs or the CLI.
"""
