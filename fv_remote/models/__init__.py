"""Models: resolving and loading a name (short name, repo id, folder, .gguf) into a `LoadedModel`, and the
per-family adapters (module paths, sizes).
"""
