"""After training: evaluate a checkpoint, predict a file of images, ensemble, export.

checkpoints.py  load a cifar_dist checkpoint or a reference-project state dict into its model
scoring.py      class probabilities of a split or of images, TTA views averaged (softmax)
methods.py      plain | tta | class_specialized | adaptive, and fitting them on the val split
metrics.py      precision / recall / F1 / support, calibration; plots.py draws the figures
inputs.py       image files to predict (pickles, .npz) and ID,Labels submission CSVs
evaluate.py, predict.py, ensemble.py, export.py: the commands of the same names
Models and loaders come from `engine.build`, as in training.
"""
