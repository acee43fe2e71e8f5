"""Relational knowledge: fine-tuned FVs (FFVs), banks of them, decoding, alignment with human ratings,
analogies with composite FVs and their learned combiner, the bank's geometry.
"""
