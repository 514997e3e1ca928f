"""Data sets: the labels.csv reader, records and splits, MRNet and fastMRI+, preprocessing, augmentation, the torch Dataset."""
