"""The training loop pieces: run configuration, step, schedules, metrics."""
