"""What a row's text is worth, as data on the row: quality flags (flags.py), run-level figures and
the checks no single row can make (run_checks.py). Flags describe; a row's status stays ok."""

from pipeline.quality.flags import quality_flags

__all__ = ["quality_flags"]
