"""The batch job's flow: the stages as Ray Data UDFs (stages), the run that plans, writes and
commits (run), and the dry run's checks (preflight)."""
