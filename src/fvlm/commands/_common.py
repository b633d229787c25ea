"""Argument helpers shared by the subcommands."""

from __future__ import annotations

import argparse


def add_config_args(p: argparse.ArgumentParser, default: str | None = None) -> None:
    """``--config`` (preset name or JSON file) and repeatable ``--set KEY=VALUE`` (dest ``overrides``)."""
    p.add_argument("--config", default=default,
                   help="preset name (paper_vitb, demo, tiny) or JSON file" + (f" (default: {default})" if default
                                                                                else " (default: built-in defaults)"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=1e-4 (repeatable; values are JSON)")


def exit_code(ok: bool) -> int:
    """0 when a job succeeded, 1 when it finished but some items failed (they are reported)."""
    return 0 if ok else 1
