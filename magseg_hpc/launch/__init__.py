"""Where jobs run: submitit jobs (training, one command) and Dask clusters, split by concern.

- :mod:`~magseg_hpc.launch.profile`: the job-profile schema (``jobs/*.yaml``), shared by
  submitit and dask-jobqueue.
- :mod:`~magseg_hpc.launch.resources`: the executor and its parameters from a profile and flags.
- :mod:`~magseg_hpc.launch.sbatch`: the batch script for ``--dry-run``.
- :mod:`~magseg_hpc.launch.tasks`: ``Task(function, spec, run dir)``, the one callable a
  job runs, and its requeue (``spec.resumed()``).
- :mod:`~magseg_hpc.launch.jobs`: what each job kind runs from its spec (training,
  segment-volume with its Dask cluster, evaluate).
- :mod:`~magseg_hpc.launch.submission`: submitting, waiting, SLURM's errors in one line.
- :mod:`~magseg_hpc.launch.dask_cluster`: the Dask cluster a segmentation runs on (local,
  an existing scheduler, or SLURM workers through dask-jobqueue) and its dashboard.

The command line is :mod:`magseg_hpc.commands.submit` (``python -m magseg_hpc.submit`` and
``magseg-hpc submit``).
"""
