"""Market analysis: ground truth by fine-tuning, validity metrics, result files and the report."""
