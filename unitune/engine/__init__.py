"""The one training loop (loop.py) and what it needs: precision, schedules, checkpoints, logs."""
