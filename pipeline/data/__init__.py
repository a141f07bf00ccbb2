"""Faces in: the CSV or a UTKFace folder, labels, the split, and a photo's face as the model sees it."""
