"""What the console scripts share. `exits.py`: how every command ends (one-line errors and their exit codes, stop
signals, a stdout or stderr whose reader went away)."""
