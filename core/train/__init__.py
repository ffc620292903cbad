"""Training: the loop, optimizer, schedules and experiment management."""
