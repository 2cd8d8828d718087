"""Scaling out with torchrun: FSDP2 data parallelism, expert parallelism and DCP checkpoints.

parallelize.py builds the process group and mesh and shards a model by wrapping it;
expert_parallel.py moves routed tokens to the ranks owning their experts (all_to_all);
checkpoint.py saves and reloads sharded training state. The model imports nothing from here.
"""
