"""What a run will do before it does it: the manifest read and validated (manifest), the rows still
to do against the committed output (plan), and how a model fits the cluster's GPUs (sizing)."""
