"""Batch jobs (stage 5, an entry point), made to run under `ray job submit`.

May import every stage below it (the service, the engine, the store); never serve or the CLI.
"""
