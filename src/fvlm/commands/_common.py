"""Shared argument helpers of the subcommands."""
from __future__ import annotations

import argparse


def add_config_args(p: argparse.ArgumentParser, default: str | None = None) -> None:
    p.add_argument("--config", default=default,
                   help="preset name (paper_vitb, demo, tiny) or JSON file" + (f" (default: {default})" if default
                                                                                else " (default: built-in defaults)"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=1e-4 (repeatable; values are JSON)")
