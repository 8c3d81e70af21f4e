"""The REASON expert: Logical reasoning for MTG rules and interactions."""
