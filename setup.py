"""Only the C extension lives here; everything else is in pyproject.toml.

The fast CPU decoder (endor_ray/format/_expand.c) is optional: where it cannot be built (no C
compiler), the install still succeeds and endor_ray.format.cpu_decode falls back to torch.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "endor_ray.format._expand",
    sources=["endor_ray/format/_expand.c"],
    extra_compile_args=["-O3", "-std=c11"],
    optional=True,
)])
