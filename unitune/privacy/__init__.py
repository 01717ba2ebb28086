"""Privacy: personal data scrubbed from training rows before a model can learn it (scrub.py)."""
