"""SLURM: the batch script (train_gpu.sbatch) and the sweep's calls to sbatch and squeue (jobs)."""
