"""The processes: torch.distributed groups and reductions, process settings, what a run costs."""
