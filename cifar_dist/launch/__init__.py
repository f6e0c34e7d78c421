"""Launchers: one node (local.py, what launch/train runs) and Slurm."""
