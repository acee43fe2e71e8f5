"""Foundations every other package uses: user errors, the progress callback, guards at a command's edges
(output paths, atomic writes), plots. Imports nothing else of fv_remote.
"""
