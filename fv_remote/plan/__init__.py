"""The cost of a remote stage before it runs (FLOPs, bytes each way, memory, time) and the verdict against
NDIF's limits.
"""
