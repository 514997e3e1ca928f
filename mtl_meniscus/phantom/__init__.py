"""The built-in phantom: synthetic sagittal slices and exams with known labels."""
