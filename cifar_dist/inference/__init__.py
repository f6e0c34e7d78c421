"""After training: evaluate a checkpoint, predict a file of images, ensemble, export.

weights.py      load a cifar_dist checkpoint or a reference-project state dict into its model
scoring.py      class probabilities of a split or of images, with TTA by the checkpoint's rule
methods.py      plain | tta | class_specialized | adaptive, and fitting them on the val split
inputs.py       image files to predict (pickles, .npz) and ID,Labels submission CSVs
evaluate.py, predict.py, ensemble.py, export.py: the commands of the same names
Models and loaders come from `engine.build`, as in training; metrics and figures from
`cifar_dist.metrics` and `cifar_dist.plots`, the run folder's shared files from `cifar_dist.run_files`.
"""

EXPORT_FORMATS = ("onnx", "torchscript")  # here, without torch, for the command line's choices
