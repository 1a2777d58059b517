"""Low-carbon incentive records: interval energy, baselines, carbon, signed and pseudonymous."""
