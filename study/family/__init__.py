"""Building the embedded family: training data and splits, the training script, refusal figures."""
