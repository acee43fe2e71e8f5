"""Intervention graphs that run inside nnsight traces.

Everything here may be shipped to NDIF's sandbox, so it imports only torch, math, typing, collections
and numpy, and nothing from the rest of fv_remote.
"""
