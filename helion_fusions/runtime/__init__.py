"""The generic runtime: op declarations and registration, dispatch, device identity, configs, checks.

It knows no op by name and imports nothing above it (no kernel, quant or ops module).
"""
