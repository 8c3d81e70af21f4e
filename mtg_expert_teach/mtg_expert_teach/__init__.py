"""The TEACH expert: Educational content for learning the game."""
