"""Weight grafting: localise where fine-tuned relational knowledge lives (enrichment vs recall pathways).

`synthetic` invents facts, `finetune` teaches them to a model, `graft` runs the pretrained model with fine-tuned
weights at chosen components / layers / token positions, and `sweep` runs the standard pathway configurations.
Local only (see `graft`).
"""
