"""Triton kernels, imported as endor_ray.kernels (see pyproject.toml). Each module holds the
kernel, its launching wrapper and the torch reference it must match bit for bit."""
