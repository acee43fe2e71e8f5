"""The activation store (Zarr v3 via xarray, commit points, identity, writer lock) and its integrity checks
(`store verify` / `repair`).
"""
