"""Batch jobs over the endor-ray service, made to run under `ray job submit`."""
