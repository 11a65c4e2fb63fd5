"""`python -m strokes_jax pod ...`: TPU VM slices driven through the gcloud CLI.

The launcher ships in the wheel because half of it runs on the TPU workers: the laptop side
(`cli`, `jobs`, `sweep_jobs`, `gcloud`, `state`) creates the slice, installs this wheel on
every worker and starts the job there through `gcloud compute tpus tpu-vm ssh --worker=all`;
the worker side (`worker`) keeps the job running detached from that ssh session, records its
exit code and serves its status and logs, so a disconnected laptop can reattach later.
Nothing here imports JAX. docs/pods.md has the user's guide.
"""
