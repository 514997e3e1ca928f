"""Networks: trunks and heads, the masked multi-task loss and task weightings, Grad-CAM."""
