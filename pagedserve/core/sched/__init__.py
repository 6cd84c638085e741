"""Iteration-level scheduling: the continuous policy and the static baseline, one Scheduler."""
