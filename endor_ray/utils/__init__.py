"""Small helpers every stage may use: sizes for people (`units`), whole-or-nothing writes
(`atomic`), fetching ahead of use over a fixed order of layers (`prefetch`), the engine, scheduler
and cluster options every entry point declares once (`options`: the configs are passed in, never
imported). Imports nothing of endor_ray but `endor_ray.errors`."""
