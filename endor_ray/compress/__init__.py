"""Compression (stage 3 of the data's path: checkpoint -> compression -> store).

Owns reading source checkpoints (`checkpoint`, the embedded default model `default_model`),
pruning (`prune`: magnitude, Wanda; `sparsegpt`), calibration (`calibration`), one tensor's
setting applied (`setting`), the mixed-precision choice (`mixed`) and conversion of a
checkpoint into a store (`convert`). May import the format, models and the store it writes;
never the engine, Ray or the entry points.
"""
