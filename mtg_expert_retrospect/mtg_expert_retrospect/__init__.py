"""The RETROSPECT expert: Game analysis and decision review."""
