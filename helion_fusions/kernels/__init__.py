"""Helion kernels, one module per fusion family, each with its eager reference and op declarations."""
