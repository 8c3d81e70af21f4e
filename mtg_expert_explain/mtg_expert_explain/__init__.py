"""The EXPLAIN expert: Clear rule explanations for players."""
