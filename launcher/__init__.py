"""What runs on the login node: one backend per scheduler (backends/: Slurm's state and sbatch, this machine),
building and submitting jobs through them, following them; launch.py is its command line. Nothing here runs
inside a job."""
