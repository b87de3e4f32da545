"""Generation under ablation (decoding, backends, the HF backend) and the judges of what was generated."""
