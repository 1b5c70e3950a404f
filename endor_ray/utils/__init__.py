"""Small helpers every stage may use: sizes for people (`units`), whole-or-nothing writes
(`atomic`). Imports nothing of endor_ray but `endor_ray.errors`."""
