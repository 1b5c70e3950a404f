"""Only the C extension lives here; everything else is in pyproject.toml.

The fast CPU decoder (endor_ray/format/_expand.c: the Endor encodings; _gguf.c: GGUF blocks; _matvec.c:
small-batch products straight from the blocks) is optional: where it cannot be built (no C compiler), the install still succeeds and endor_ray.format.cpu_decode falls back to torch.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "endor_ray.format._expand",
    sources=["endor_ray/format/_expand.c", "endor_ray/format/_gguf.c", "endor_ray/format/_matvec.c"],
    depends=["endor_ray/format/_decode.h"],
    # no fused multiply-add: the decoders' float32 products and sums are the references' own (the products
    # fuse only where _matvec.c asks for it, in every implementation alike)
    extra_compile_args=["-O3", "-std=c11", "-ffp-contract=off"],
    optional=True,
)])
