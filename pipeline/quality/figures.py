"""Run-level quality figures: rows per quality flag and per finish reason, counted with pyarrow from
an output table's columns (a file at a time, or per block on Ray), summed, and worded for the summary
line, the ledger and --dry-run."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa

COLUMNS = ["status", "quality_flags", "finish_reason"]


@dataclass
class QualityCounts:
    generated: int = 0  # rows with generated text (ok rows written with version 2 of the schema)
    flagged: int = 0  # of those, rows with at least one flag
    by_flag: Counter = field(default_factory=Counter)
    by_finish_reason: Counter = field(default_factory=Counter)

    def add(self, rows: pa.Table) -> QualityCounts:
        """Count the rows of a table holding COLUMNS (rows of older outputs have null flags: not counted)."""
        import pyarrow.compute as pc

        flags = rows["quality_flags"]
        judged = pc.is_valid(flags)
        self.generated += pc.sum(pc.cast(judged, pa.int64())).as_py() or 0
        self.flagged += pc.sum(pc.cast(pc.fill_null(pc.greater(pc.list_value_length(flags), 0), False), pa.int64())).as_py() or 0
        for column, counter in ((pc.list_flatten(flags), self.by_flag), (rows["finish_reason"], self.by_finish_reason)):
            for item in pc.value_counts(column.drop_null()).to_pylist():
                if item["values"] is not None:
                    counter[item["values"]] += item["counts"]
        return self

    def merge(self, other: QualityCounts) -> QualityCounts:
        self.generated += other.generated
        self.flagged += other.flagged
        self.by_flag.update(other.by_flag)
        self.by_finish_reason.update(other.by_finish_reason)
        return self

    def to_dict(self) -> dict:
        return {"generated_rows": self.generated, "flagged_rows": self.flagged, "by_flag": dict(sorted(self.by_flag.items())),
                "by_finish_reason": dict(sorted(self.by_finish_reason.items()))}

    @classmethod
    def from_dict(cls, d: dict | None) -> QualityCounts:
        d = d or {}
        return cls(d.get("generated_rows", 0), d.get("flagged_rows", 0), Counter(d.get("by_flag", {})),
                   Counter(d.get("by_finish_reason", {})))

    def line(self) -> str:
        """`quality: 2 of 7 rows flagged (repetition=2, truncated=1); finish: length=1 stop=6`"""
        if not self.generated:
            return "quality: no generated rows"
        flags = ", ".join(f"{k}={v}" for k, v in sorted(self.by_flag.items()))
        finish = " ".join(f"{k}={v}" for k, v in sorted(self.by_finish_reason.items()))
        return (f"quality: {self.flagged} of {self.generated} rows flagged{f' ({flags})' if flags else ''}"
                f"{f'; finish: {finish}' if finish else ''}")
