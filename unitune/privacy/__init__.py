"""Privacy: differentially private training (dp.py), personal data scrubbed from training rows (scrub.py),
canaries planted in training data (canary.py) and the audit of what a tuned model gives away (audit.py)."""
