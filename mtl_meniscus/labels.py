"""The three tasks and how their text labels map to binary targets."""

TASKS: tuple[str, ...] = ("fissure", "orientation", "position")

# Text values allowed in labels.csv and the binary target each one stands for; the positive class
# (target 1) is what predictions report as p_horizontal and p_anterior.
ORIENTATION_VALUES = {"horizontal": 1.0, "vertical": 0.0}
POSITION_VALUES = {"anterior": 1.0, "posterior": 0.0}
DOUBLE_TEAR = "both"  # position of a tear in both horns; excluded by default, as in the reference method

# Challenge weights: score = 0.4 AUC(fissure) + 0.3 AUC(orientation) + 0.3 AUC(position).
CHALLENGE_WEIGHTS = {"fissure": 0.4, "orientation": 0.3, "position": 0.3}


def orientation_name(target: float) -> str:
    """Text label of an orientation target (1 = horizontal)."""
    return "horizontal" if target >= 0.5 else "vertical"


def position_name(target: float) -> str:
    """Text label of a position target (1 = anterior)."""
    return "anterior" if target >= 0.5 else "posterior"


def gated_labels(
    p_fissure: float, p_horizontal: float, p_anterior: float, threshold: float
) -> tuple[int, str, str]:
    """Cascade gating: (tear 0/1, orientation, position); orientation and position only for a tear."""
    if p_fissure < threshold:
        return 0, "", ""
    return 1, orientation_name(p_horizontal), position_name(p_anterior)
