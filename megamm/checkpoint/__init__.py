"""Sharded, reshardable checkpoints on torch.distributed.checkpoint."""
