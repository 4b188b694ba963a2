"""`deepflow serve` (placeholder until the server lands)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the `serve` subcommand to the `deepflow` parser."""
