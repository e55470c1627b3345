"""Gradient buffers with bucketed data-parallel sync, optimizers, clipping, loss scaling, schedules."""
