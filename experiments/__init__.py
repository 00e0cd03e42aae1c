"""Ablation matrices and tuning studies: the YAMLs in this folder and the launcher that runs them."""
