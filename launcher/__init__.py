"""What runs on the login node: Slurm's state, building and submitting jobs, following them; launch.py is its
command line. Nothing here runs inside a job."""
