"""Model definitions, synthetic data generation and training for ctr-serve."""
