"""Scripted checks of a running deployment, found through its registry; every check can fail."""
from __future__ import annotations

from .checks import fair_share, run_checks
from .cli import (
    EXIT_FAIL,
    EXIT_OK,
    EXIT_USAGE,
    UsageError,
    build_parser,
    format_row,
    main,
    options_from_args,
    parse_services,
    summary_line,
)
from .options import DEMO_SERVICES, CheckResult, ExpectedService, ValidateOptions

__all__ = ["CheckResult", "DEMO_SERVICES", "EXIT_FAIL", "EXIT_OK", "EXIT_USAGE", "ExpectedService", "UsageError",
           "ValidateOptions", "build_parser", "fair_share", "format_row", "main", "options_from_args",
           "parse_services", "run_checks", "summary_line"]
