"""The command line: Hydra-driven stages (``crp-toolkit <stage> [overrides]``)."""
