"""Reading and writing files: images and volumes, exam folders, run outputs, the run lock."""
