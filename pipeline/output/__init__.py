"""The output: where it is (location), what it already holds (committed: the committed-key rule),
the Parquet rows staged and committed exactly once (commit), one run at a time per output (lease),
and the HTML report of a committed output (report)."""
