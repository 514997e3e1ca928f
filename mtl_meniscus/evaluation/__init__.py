"""Scores and figures: AUCs with confidence intervals, DeLong, ROC and training plots."""
