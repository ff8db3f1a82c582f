"""The output: the Parquet rows staged and committed exactly once (commit), one run at a time per
output (lease), and the HTML report of a committed output (report)."""
