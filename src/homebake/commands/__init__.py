"""CLI commands; each module registers one command (or group) with the parser in homebake.cli."""
