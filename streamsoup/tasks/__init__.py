"""The per-tensor task a worker runs: the dense, streamed and low-rank paths, and what each gives back."""
