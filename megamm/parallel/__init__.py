"""Process groups, tensor-parallel layers, autograd collectives, vocab-parallel loss and RNG tracking."""

from megamm.parallel.state import ParallelState, initialize_parallel_state

__all__ = ["ParallelState", "initialize_parallel_state"]
