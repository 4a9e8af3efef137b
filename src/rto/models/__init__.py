"""Models: loading and saving, token log-probabilities, score and value heads."""
