"""The vectors the field compares FVs against: task vectors, in-context vectors, mean-difference and PCA vectors,
built from paired residual-stream reads and placed on validation pairs."""
