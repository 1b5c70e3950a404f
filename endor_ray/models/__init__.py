"""The model families endor-ray runs (stage 1, beside the format).

Owns which architectures are supported and where their decoder layers and prunable weights are
(`architecture`), and the transformers model whose decoder layers are filled in by hooks
(`skeleton`). May import the format, transformers (lazily where it costs), never the store,
engine, Ray or the entry points.
"""
