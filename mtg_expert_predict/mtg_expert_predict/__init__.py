"""The PREDICT expert: Game state and probability analysis."""
