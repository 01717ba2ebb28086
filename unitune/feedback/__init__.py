"""Feedback on model outputs that becomes training data: human labelling (`label`)."""
