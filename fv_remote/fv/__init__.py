"""Function vectors: the head stages (extract, CMA and the cheaper head scores), vectors from top heads,
steering, evaluation, and one task end to end (`pipeline`).
"""
