"""Vectors out of and into the lab: llama.cpp control vectors (GGUF).
"""
