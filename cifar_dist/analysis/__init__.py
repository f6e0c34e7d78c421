"""Reading finished runs: comparisons of their accuracies."""
